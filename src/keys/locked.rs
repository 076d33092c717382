//! Where host-custody key bytes live, and the process settings that keep them to this process.
//!
//! * [`SecretArena`]: 32-byte slots in anonymous mappings that are locked in RAM (`mlock`: never
//!   written to swap) and advised `MADV_DONTDUMP` (left out of core dumps). A [`LockedKey`] owns
//!   one slot, lends its bytes to a closure under a read lock, and zeroizes the slot when dropped
//!   (the last request using an evicted key finishes). Signing builds the key's arithmetic form
//!   from these bytes for each signature (a scalar parse, or one SHA-512 for Ed25519): nothing
//!   derived from the key is kept outside the arena.
//! * [`harden_process`]: `PR_SET_DUMPABLE` 0: no core dumps at all, and no ptrace attach or
//!   /proc/PID/mem reads by other processes of the same user.
//! * [`scrub_stack`]: overwrites the stack below its caller, where the frames of a finished
//!   operation (PKCS#8 parsing, AES key unwrap, RFC 6979 and scalar arithmetic) left derived
//!   key material that no destructor reaches.
//!
//! No `unsafe` here: `memmap2` (map, mlock, madvise) and `rustix` (prctl) wrap the system calls.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use memmap2::{Advice, MmapMut};
use zeroize::Zeroize as _;

/// Bytes of one slot: a secp256k1 scalar or an Ed25519 seed.
pub const SLOT: usize = 32;
/// Bytes of one mapping (16 pages: 2,048 slots).
const CHUNK: usize = 64 * 1024;

/// Locked memory could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockedError {
    /// mmap, mlock or madvise failed (mlock: RLIMIT_MEMLOCK too small, or no CAP_IPC_LOCK).
    #[error(
        "cannot lock {bytes} more bytes of host-custody key memory ({step}: {source}); raise the \
         memory-lock limit (systemd LimitMEMLOCK=, `ulimit -l`, a container's --ulimit memlock) or \
         use hsm custody"
    )]
    Memory {
        /// Which call.
        step: &'static str,
        /// Bytes asked for.
        bytes: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key of the wrong length.
    #[error("a host key must be {SLOT} bytes")]
    Length,
}

type Chunk = Arc<RwLock<MmapMut>>;

struct State {
    chunks: Vec<Chunk>,
    /// Free slots: (chunk index, byte offset).
    free: Vec<(usize, usize)>,
}

/// Locked, non-dumpable slots for host key bytes. Grows one 64 KiB mapping at a time.
pub struct SecretArena {
    state: Mutex<State>,
}

impl std::fmt::Debug for SecretArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("SecretArena")
            .field("chunks", &st.chunks.len())
            .field("free", &st.free.len())
            .finish()
    }
}

fn new_chunk() -> Result<MmapMut, LockedError> {
    let err = |step| {
        move |source| LockedError::Memory {
            step,
            bytes: CHUNK,
            source,
        }
    };
    let map = MmapMut::map_anon(CHUNK).map_err(err("mmap"))?;
    map.advise(Advice::DontDump).map_err(err("madvise(MADV_DONTDUMP)"))?;
    map.lock().map_err(err("mlock"))?;
    Ok(map)
}

/// Can this process lock key memory? Maps, advises and locks one chunk and lets it go (the
/// daemon checks this at start in host custody, so a low RLIMIT_MEMLOCK fails there, not on
/// the first request).
pub fn check_lockable() -> Result<(), LockedError> {
    new_chunk().map(drop)
}

impl SecretArena {
    /// An empty arena; the first slot maps and locks the first 64 KiB.
    pub fn new() -> Arc<SecretArena> {
        Arc::new(SecretArena {
            state: Mutex::new(State {
                chunks: Vec::new(),
                free: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a push or pop: a panic cannot leave the lists inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies `bytes` into a fresh slot (the caller zeroizes its own copy).
    pub fn store(self: &Arc<Self>, bytes: &[u8]) -> Result<LockedKey, LockedError> {
        if bytes.len() != SLOT {
            return Err(LockedError::Length);
        }
        let (index, offset, chunk) = {
            let mut st = self.lock();
            if st.free.is_empty() {
                let map = new_chunk()?;
                let index = st.chunks.len();
                st.chunks.push(Arc::new(RwLock::new(map)));
                st.free.extend((0..CHUNK / SLOT).rev().map(|i| (index, i * SLOT)));
            }
            let Some((index, offset)) = st.free.pop() else {
                return Err(LockedError::Length);
            };
            let chunk = st.chunks[index].clone();
            (index, offset, chunk)
        };
        chunk.write().unwrap_or_else(|p| p.into_inner())[offset..offset + SLOT].copy_from_slice(bytes);
        Ok(LockedKey {
            arena: self.clone(),
            chunk,
            index,
            offset,
        })
    }

    /// Slots in use (for tests and metrics).
    pub fn in_use(&self) -> usize {
        let st = self.lock();
        st.chunks.len() * (CHUNK / SLOT) - st.free.len()
    }
}

/// One key's bytes in the arena; zeroized when dropped.
pub struct LockedKey {
    arena: Arc<SecretArena>,
    chunk: Chunk,
    index: usize,
    offset: usize,
}

impl std::fmt::Debug for LockedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockedKey(..)")
    }
}

impl LockedKey {
    /// Lends the 32 key bytes to `f`.
    pub fn with<R>(&self, f: impl FnOnce(&[u8; SLOT]) -> R) -> R {
        const EMPTY: [u8; SLOT] = [0; SLOT];
        let map = self.chunk.read().unwrap_or_else(|p| p.into_inner());
        // Slots are SLOT bytes by construction; EMPTY is never lent.
        f(<&[u8; SLOT]>::try_from(&map[self.offset..self.offset + SLOT]).unwrap_or(&EMPTY))
    }
}

impl Drop for LockedKey {
    fn drop(&mut self) {
        self.chunk.write().unwrap_or_else(|p| p.into_inner())[self.offset..self.offset + SLOT].zeroize();
        self.arena.lock().free.push((self.index, self.offset));
    }
}

/// `PR_SET_DUMPABLE` 0 for the whole process: no core dumps, no ptrace or /proc/PID/mem access
/// by other unprivileged processes. Idempotent.
pub fn harden_process() -> std::io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable).map_err(std::io::Error::from)
}

/// Overwrites `N` bytes of stack below the caller with zeros. Call right after an operation on
/// key bytes returns, from the function that called it, so its finished frames lie in the
/// overwritten range.
///
/// `zeroize::zeroize_stack` writes them with one bulk fill behind an assembly barrier, so the
/// optimiser keeps it; byte-by-byte volatile writes of the same 16 KiB took about 3 % of a
/// signing request's CPU.
#[inline(never)]
pub fn scrub_stack<const N: usize>() {
    zeroize::zeroize_stack::<N>();
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: u8 = 0xA5;

    /// Leaves 4 KiB of `MARK` in a finished frame 8 KiB below the caller's; its address.
    #[inline(never)]
    fn leave_marks() -> usize {
        #[inline(never)]
        fn deeper() -> usize {
            let mut marks = [MARK; 4096];
            std::hint::black_box(&mut marks);
            marks.as_ptr() as usize
        }
        let mut pad = [0u8; 8192];
        std::hint::black_box(&mut pad);
        let at = deeper();
        std::hint::black_box(&pad);
        at
    }

    /// How many bytes of the 4 KiB at `at` (this thread's stack) still hold `MARK`, read
    /// through `/proc/self/mem` (a pread, whose own frames stay far above `at`).
    fn marks_left(mem: &std::fs::File, at: usize) -> usize {
        use std::os::unix::fs::FileExt as _;
        let mut seen = [0u8; 4096];
        mem.read_exact_at(&mut seen, at as u64).expect("read own stack");
        seen.iter().filter(|b| **b == MARK).count()
    }

    #[test]
    fn scrub_stack_zeroes_the_finished_frames_below_it() {
        let mem = std::fs::File::open("/proc/self/mem").expect("open /proc/self/mem");
        // Without a scrub the marks stay: the check can see them.
        let at = leave_marks();
        assert!(
            marks_left(&mem, at) > 4000,
            "the marks were not found where they were left"
        );
        let at = leave_marks();
        scrub_stack::<{ 16 * 1024 }>();
        assert_eq!(marks_left(&mem, at), 0, "marks survived the scrub");
    }

    #[test]
    fn slots_are_lent_zeroized_and_reused() {
        let arena = SecretArena::new();
        let a = arena.store(&[7u8; SLOT]).expect("locked memory");
        let b = arena.store(&[9u8; SLOT]).expect("locked memory");
        assert_eq!(arena.in_use(), 2);
        assert_eq!(a.with(|k| *k), [7u8; SLOT]);
        assert_eq!(b.with(|k| *k), [9u8; SLOT]);
        let (chunk, offset) = (a.chunk.clone(), a.offset);
        drop(a);
        assert_eq!(arena.in_use(), 1);
        let map = chunk.read().expect("lock");
        assert_eq!(&map[offset..offset + SLOT], &[0u8; SLOT], "dropped slot is zeroized");
        drop(map);
        let c = arena.store(&[1u8; SLOT]).expect("locked memory");
        assert_eq!(c.offset, offset, "freed slot is reused");
        assert!(arena.store(&[1u8; 31]).is_err());
    }

    #[test]
    fn the_arena_grows_past_one_mapping() {
        let arena = SecretArena::new();
        let keys: Vec<_> = (0..CHUNK / SLOT + 1)
            .map(|i| arena.store(&[(i % 251) as u8; SLOT]).expect("locked memory"))
            .collect();
        assert_eq!(arena.in_use(), CHUNK / SLOT + 1);
        assert_eq!(keys[CHUNK / SLOT].with(|k| k[0]), ((CHUNK / SLOT) % 251) as u8);
    }
}
