//! Differential test of keyward's EIP-712 encoder against an independent implementation.
//!
//! What it proves:
//! - On several hundred randomly generated *valid* `eth_signTypedData_v4` documents,
//!   `keyward::crypto::eip712::TypedData` accepts every one and computes exactly the signing
//!   hash that Python's eth-account computes (`tests/interop/eip712_batch.py`, one process for
//!   the whole batch). The documents cover random struct graphs (shared and nested references,
//!   declaration and reference orders that differ from the alphabetical `encodeType` order),
//!   fixed and dynamic arrays (empty, nested, of structs), every atomic type with edge values,
//!   integers spelled as JSON numbers, decimal and hex strings, unicode and JSON escapes, and
//!   random subsets of the canonical domain fields.
//! - On mutations of valid documents that are invalid by construction (integer out of range,
//!   `bytesN` of the wrong length, undefined type, missing field, address of the wrong length,
//!   fixed-size array of the wrong length, non-hex bytes, and a struct referencing itself
//!   through an array, which keyward refuses as cyclic), keyward refuses every one, with the
//!   error variant and document path the mutation calls for. eth-account's answers on those
//!   are only counted (it is more lenient in places).
//!
//! Everything is driven by one `u64` seed: `KEYWARD_EIP712_SEED` if set, else random. The
//! seed is printed and is part of every failure message; rerun with
//! `KEYWARD_EIP712_SEED=<seed> cargo nextest run --test eip712_differential` to replay.
//! Without python3 or eth-account the comparison is skipped with a `SKIPPED` line (keyward's
//! own checks still run), unless `CI=true`, where that is a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use keyward::crypto::eip712::{Eip712Error, TypedData};
use num_bigint::{BigInt, BigUint, Sign};
use num_traits::{One as _, Zero as _};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng, SeedableRng as _};
use sha3::{Digest as _, Keccak256};

/// Valid documents compared against eth-account.
const VALID_DOCS: usize = 600;
/// Valid documents the invalid mutations start from.
const MUTATION_BASE_DOCS: usize = 200;
/// Invalid mutations of each kind.
const MUTATIONS_PER_KIND: usize = 40;
/// Struct types per document, `EIP712Domain` not counted (keyward allows 127).
const MAX_STRUCTS: usize = 6;
/// Deepest struct/array nesting generated, by keyward's measure (keyward allows 16).
const MAX_NESTING: usize = 10;
/// Values per document before the generator starts over (keeps documents small).
const MAX_VALUES: usize = 1500;
/// Largest serialized document kept (keyward allows 256 KiB).
const MAX_JSON_BYTES: usize = 48 * 1024;

// ---------------------------------------------------------------------------------------
// Seed and the independent implementation
// ---------------------------------------------------------------------------------------

fn seed() -> u64 {
    let seed = match std::env::var("KEYWARD_EIP712_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("KEYWARD_EIP712_SEED={s:?} is not a decimal u64: {e}")),
        Err(_) => rand::random(),
    };
    println!("eip712 differential seed: {seed} (replay with KEYWARD_EIP712_SEED={seed})");
    seed
}

/// Without python3 or eth-account: `None` and a loud SKIPPED line, or a panic under `CI=true`.
fn skip_or_fail(seed: u64, why: &str) -> Option<Vec<String>> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("seed {seed}: the independent EIP-712 implementation must run under CI: {why}");
    }
    eprintln!("SKIPPED independent EIP-712 differential (seed {seed}): {why}");
    None
}

/// eth-account's answer for each document (one line each), from one python3 process.
fn eth_account_batch(seed: u64, docs: &[String]) -> Option<Vec<String>> {
    use std::io::Write as _;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/eip712_batch.py");
    let child = std::process::Command::new("python3")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return skip_or_fail(seed, &format!("python3 is not installed ({e})"))
        }
        Err(e) => panic!("seed {seed}: cannot run python3 {}: {e}", script.display()),
    };
    let mut input = String::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
    for d in docs {
        assert!(
            !d.contains('\n'),
            "seed {seed}: a serialized document holds a raw newline"
        );
        input.push_str(d);
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("python3 stdin is piped");
    // Written from another thread so a full stdout pipe cannot block both sides.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("wait for python3");
    let written = writer.join().expect("stdin writer thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("No module named") {
            return skip_or_fail(
                seed,
                &format!(
                    "python eth-account is not installed (pip install eth-account): {}",
                    stderr.trim().lines().last().unwrap_or_default()
                ),
            );
        }
        panic!("seed {seed}: eip712_batch.py failed ({}): {stderr}", out.status);
    }
    written.unwrap_or_else(|e| panic!("seed {seed}: writing the batch to eip712_batch.py: {e}; stderr: {stderr}"));
    let text = String::from_utf8(out.stdout).expect("eip712_batch.py prints UTF-8");
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(
        lines.len(),
        docs.len(),
        "seed {seed}: eip712_batch.py answered {} lines for {} documents; stderr: {stderr}",
        lines.len(),
        docs.len()
    );
    Some(lines)
}

/// keyward's answer in the script's format: `0x<digest>` or `error: <reason>`.
fn keyward_answer(doc: &str) -> Result<String, Eip712Error> {
    TypedData::from_slice(doc.as_bytes()).map(|td| format!("0x{}", hex::encode(td.signing_hash())))
}

// ---------------------------------------------------------------------------------------
// JSON with control over key order and escapes
// ---------------------------------------------------------------------------------------

/// A JSON value whose objects keep their key order and whose numbers keep their exact text.
#[derive(Clone, Debug)]
enum J {
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Serializes a [`J`] on one line, escaping characters at random (always those JSON requires
/// escaped, others as `\uXXXX` with surrogate pairs beyond the BMP) and adding random spaces.
struct Writer<'a> {
    rng: &'a mut StdRng,
    /// Chance that a character that may appear raw is escaped.
    escape: f64,
    spaces: bool,
    escapes: usize,
    out: String,
}

impl Writer<'_> {
    fn write(rng: &mut StdRng, j: &J, stats: &mut Stats) -> String {
        let escape = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.05..0.5)
        };
        let spaces = rng.gen_bool(0.3);
        let mut w = Writer {
            rng,
            escape,
            spaces,
            escapes: 0,
            out: String::new(),
        };
        w.value(j);
        stats.add("JSON escapes written", w.escapes);
        w.out
    }

    fn space(&mut self) {
        if self.spaces && self.rng.gen_bool(0.3) {
            self.out.push(if self.rng.gen_bool(0.8) { ' ' } else { '\t' });
        }
    }

    fn value(&mut self, j: &J) {
        self.space();
        match j {
            J::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            J::Num(t) => self.out.push_str(t),
            J::Str(s) => self.string(s),
            J::Arr(items) => {
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.value(item);
                }
                self.space();
                self.out.push(']');
            }
            J::Obj(entries) => {
                self.out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.space();
                    self.string(k);
                    self.space();
                    self.out.push(':');
                    self.value(v);
                }
                self.space();
                self.out.push('}');
            }
        }
        self.space();
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            let short = match c {
                '\u{8}' => Some("\\b"),
                '\u{c}' => Some("\\f"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                _ => None,
            };
            if let Some(esc) = short {
                if self.rng.gen_bool(0.5) {
                    self.out.push_str(esc);
                    self.escapes += 1;
                    continue;
                }
            }
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                c if (c as u32) < 0x20 => self.unicode_escape(c),
                '/' if self.rng.gen_bool(self.escape) => {
                    self.out.push_str("\\/");
                    self.escapes += 1;
                }
                c if self.rng.gen_bool(self.escape) => self.unicode_escape(c),
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn unicode_escape(&mut self, c: char) {
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            if self.rng.gen_bool(0.5) {
                let _ = write!(self.out, "\\u{unit:04x}");
            } else {
                let _ = write!(self.out, "\\u{unit:04X}");
            }
        }
        self.escapes += 1;
    }
}

// ---------------------------------------------------------------------------------------
// Documents
// ---------------------------------------------------------------------------------------

/// An EIP-712 type.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ty {
    Bool,
    Address,
    Str,
    Bytes,
    FixedBytes(usize),
    Uint(usize),
    Int(usize),
    Struct(String),
    /// Element type and fixed length (`None` = dynamic).
    Array(Box<Ty>, Option<usize>),
}

impl Ty {
    fn type_string(&self) -> String {
        match self {
            Ty::Bool => "bool".into(),
            Ty::Address => "address".into(),
            Ty::Str => "string".into(),
            Ty::Bytes => "bytes".into(),
            Ty::FixedBytes(n) => format!("bytes{n}"),
            Ty::Uint(b) => format!("uint{b}"),
            Ty::Int(b) => format!("int{b}"),
            Ty::Struct(name) => name.clone(),
            Ty::Array(inner, None) => format!("{}[]", inner.type_string()),
            Ty::Array(inner, Some(n)) => format!("{}[{n}]", inner.type_string()),
        }
    }

    /// The type at the bottom of (possibly nested) arrays.
    fn base(&self) -> &Ty {
        match self {
            Ty::Array(inner, _) => inner.base(),
            t => t,
        }
    }

    fn struct_base(&self) -> Option<&str> {
        match self.base() {
            Ty::Struct(name) => Some(name),
            _ => None,
        }
    }

    /// The same array shape around another base type.
    fn with_base(&self, base: Ty) -> Ty {
        match self {
            Ty::Array(inner, len) => Ty::Array(Box::new(inner.with_base(base)), *len),
            _ => base,
        }
    }
}

/// Every atomic type: bool, address, string, bytes, bytes1..32, uint8..256, int8..256.
fn all_atomic() -> Vec<Ty> {
    let mut out = vec![Ty::Bool, Ty::Address, Ty::Str, Ty::Bytes];
    out.extend((1..=32).map(Ty::FixedBytes));
    out.extend((1..=32).map(|i| Ty::Uint(i * 8)));
    out.extend((1..=32).map(|i| Ty::Int(i * 8)));
    out
}

const DOMAIN: &str = "EIP712Domain";

/// The canonical domain fields, in canonical order (eth-account rebuilds the domain type
/// from the keys present with exactly these types, in this order).
fn domain_fields() -> [(&'static str, Ty); 5] {
    [
        ("name", Ty::Str),
        ("version", Ty::Str),
        ("chainId", Ty::Uint(256)),
        ("verifyingContract", Ty::Address),
        ("salt", Ty::FixedBytes(32)),
    ]
}

#[derive(Clone, Debug)]
struct Doc {
    /// Struct types in declaration order, `EIP712Domain` included.
    types: Vec<(String, Vec<(String, Ty)>)>,
    primary: String,
    domain: J,
    message: J,
    /// Order of the four top-level keys.
    top_order: [usize; 4],
    /// Whether field definitions are written `{"type", "name"}` rather than `{"name", "type"}`.
    type_first: bool,
}

impl Doc {
    fn fields(&self, name: &str) -> &[(String, Ty)] {
        self.types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f.as_slice())
            .unwrap_or(&[])
    }

    fn to_json(&self) -> J {
        let types = J::Obj(
            self.types
                .iter()
                .map(|(name, fields)| {
                    let defs = fields
                        .iter()
                        .map(|(f, t)| {
                            let n = ("name".to_string(), J::Str(f.clone()));
                            let t = ("type".to_string(), J::Str(t.type_string()));
                            J::Obj(if self.type_first { vec![t, n] } else { vec![n, t] })
                        })
                        .collect();
                    (name.clone(), J::Arr(defs))
                })
                .collect(),
        );
        let mut parts = [
            Some(("types".to_string(), types)),
            Some(("primaryType".to_string(), J::Str(self.primary.clone()))),
            Some(("domain".to_string(), self.domain.clone())),
            Some(("message".to_string(), self.message.clone())),
        ];
        J::Obj(self.top_order.iter().filter_map(|&i| parts[i].take()).collect())
    }
}

#[derive(Default)]
struct Stats {
    counts: BTreeMap<&'static str, usize>,
    /// Atomic types of which at least one value was hashed.
    atomic: BTreeSet<String>,
    max_nesting: usize,
    max_types: usize,
    max_bytes: usize,
}

impl Stats {
    fn bump(&mut self, key: &'static str) {
        self.add(key, 1);
    }

    fn add(&mut self, key: &'static str, n: usize) {
        *self.counts.entry(key).or_default() += n;
    }

    fn merge(&mut self, other: Stats) {
        for (k, v) in other.counts {
            self.add(k, v);
        }
        self.atomic.extend(other.atomic);
        self.max_nesting = self.max_nesting.max(other.max_nesting);
        self.max_types = self.max_types.max(other.max_types);
        self.max_bytes = self.max_bytes.max(other.max_bytes);
    }

    fn count(&self, key: &str) -> usize {
        self.counts.get(key).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------

/// keyward refuses struct names that are elementary Solidity types or reserved for them
/// (`bool`, `int`, `uint8x`, `bytes99`, `fixed128x18`, ...).
fn is_reserved_type_name(s: &str) -> bool {
    matches!(
        s,
        "bool" | "address" | "string" | "bytes" | "byte" | "int" | "uint" | "fixed" | "ufixed" | "function"
    ) || ["int", "uint", "bytes", "fixed", "ufixed"].iter().any(|p| {
        s.strip_prefix(p)
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    })
}

/// A Solidity identifier `[A-Za-z_$][A-Za-z0-9_$]*` of `len` characters.
fn identifier(rng: &mut StdRng, len: usize) -> String {
    const FIRST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_$";
    const REST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$";
    let mut s = String::with_capacity(len);
    s.push(char::from(FIRST[rng.gen_range(0..FIRST.len())]));
    for _ in 1..len {
        s.push(char::from(REST[rng.gen_range(0..REST.len())]));
    }
    s
}

/// A fresh struct type name: often one that sorts or looks tricky (case, `_`, `$`, prefixes
/// of elementary type names), sometimes a long one.
fn struct_name(rng: &mut StdRng, taken: &BTreeSet<String>) -> String {
    const POOL: &str = "Mail Person Order Item ITEM item a B _ $ _x $d Z9 zeta Zeta alpha Alpha bytesData uintX internal address_ stringy boolean Int_ fixedPoint ufixedX Bytes32 Uint256 x$y __init Eip712Domain EIP712Domain_";
    let pool: Vec<&str> = POOL.split(' ').collect();
    loop {
        let name = if rng.gen_bool(0.4) {
            pool[rng.gen_range(0..pool.len())].to_string()
        } else if rng.gen_bool(0.03) {
            let len = rng.gen_range(60..=120);
            identifier(rng, len)
        } else {
            let len = rng.gen_range(1..=12);
            identifier(rng, len)
        };
        if name != DOMAIN && !is_reserved_type_name(&name) && !taken.contains(&name) {
            return name;
        }
    }
}

/// A field name not yet used in its struct.
fn field_name(rng: &mut StdRng, taken: &mut BTreeSet<String>) -> String {
    const POOL: &str =
        "from to name type value data uint256 string address bytes32 bool x _ $ a1 nonce deadline EIP712Domain";
    let pool: Vec<&str> = POOL.split(' ').collect();
    loop {
        let name = if rng.gen_bool(0.3) {
            pool[rng.gen_range(0..pool.len())].to_string()
        } else {
            let len = rng.gen_range(1..=24);
            identifier(rng, len)
        };
        if taken.insert(name.clone()) {
            return name;
        }
    }
}

/// Wraps `base` in `dims` array dimensions, each dynamic or of a fixed length 1..=3 (keyward
/// refuses a zero length: `T[0]` has a leading zero).
fn wrap(rng: &mut StdRng, base: Ty, dims: usize) -> Ty {
    let mut t = base;
    for _ in 0..dims {
        let len = if rng.gen_bool(0.5) {
            None
        } else {
            Some(rng.gen_range(1..=3))
        };
        t = Ty::Array(Box::new(t), len);
    }
    t
}

/// keyward's nesting measure of a field type: array dimensions plus the referenced struct's.
fn nesting(t: &Ty, depth_of: &BTreeMap<String, usize>) -> usize {
    match t {
        Ty::Array(inner, _) => 1 + nesting(inner, depth_of),
        Ty::Struct(name) => depth_of.get(name).copied().unwrap_or(0),
        _ => 0,
    }
}

/// A document whose struct graph, domain and values are all random; the primary type always
/// has a field of `all_atomic()[index % 100]`, so a batch of 100 or more covers every type.
fn gen_doc(rng: &mut StdRng, index: usize, stats: &mut Stats) -> (Doc, String) {
    for _ in 0..1000 {
        // Statistics count only the drafts that are kept.
        let mut draft = Stats::default();
        if let Some(out) = try_gen_doc(rng, index, &mut draft) {
            stats.merge(draft);
            return out;
        }
        stats.bump("regenerated (too large or too deep)");
    }
    panic!("document #{index}: 1000 drafts in a row were too large or too deep");
}

fn try_gen_doc(rng: &mut StdRng, index: usize, stats: &mut Stats) -> Option<(Doc, String)> {
    let atomic = all_atomic();
    let n = rng.gen_range(1..=MAX_STRUCTS);
    let mut taken = BTreeSet::from([DOMAIN.to_string()]);
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        let name = struct_name(rng, &taken);
        taken.insert(name.clone());
        names.push(name);
    }
    // Struct i references only structs j > i (acyclic), and every j > 0 is referenced by a
    // parent before it, so the primary (0) is the only type nothing references, which is how
    // eth-account derives the primary type.
    let parent: Vec<usize> = (0..n).map(|j| if j == 0 { 0 } else { rng.gen_range(0..j) }).collect();
    let mut depth_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut defs: Vec<Vec<(String, Ty)>> = vec![Vec::new(); n];
    for i in (0..n).rev() {
        let mut tys = Vec::new();
        let mut children: Vec<usize> = (i + 1..n).filter(|&j| parent[j] == i).collect();
        if i + 1 < n {
            for _ in 0..rng.gen_range(0..=2) {
                children.push(rng.gen_range(i + 1..n));
            }
        }
        for j in children {
            let child_depth = depth_of.get(&names[j]).copied().unwrap_or(1);
            let room = MAX_NESTING.saturating_sub(1 + child_depth);
            let want = match rng.gen_range(0..100) {
                0..=59 => 0,
                60..=91 => 1,
                _ => 2,
            };
            tys.push(wrap(rng, Ty::Struct(names[j].clone()), want.min(room)));
        }
        for _ in 0..rng.gen_range(0..=5) {
            let base = atomic[rng.gen_range(0..atomic.len())].clone();
            let dims = match rng.gen_range(0..100) {
                0..=64 => 0,
                65..=89 => 1,
                90..=97 => 2,
                _ => 3,
            };
            tys.push(wrap(rng, base, dims));
        }
        if i == 0 {
            tys.push(atomic[index % atomic.len()].clone());
        }
        tys.shuffle(rng);
        let mut fnames = BTreeSet::new();
        defs[i] = tys.into_iter().map(|t| (field_name(rng, &mut fnames), t)).collect();
        if defs[i].is_empty() {
            stats.bump("empty struct types");
        }
        let d = 1 + defs[i].iter().map(|(_, t)| nesting(t, &depth_of)).max().unwrap_or(0);
        depth_of.insert(names[i].clone(), d);
    }
    // Array dimensions are bounded per reference; a long chain of structs can still add up,
    // so a document nested deeper than MAX_NESTING is drawn again.
    let deepest = depth_of.values().copied().max().unwrap_or(0);
    if deepest > MAX_NESTING {
        return None;
    }

    // Graph statistics: shared references and the three orders of the dependencies.
    let mut refs: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, t) in defs.iter().flatten() {
        if let Some(s) = t.struct_base() {
            *refs.entry(s).or_default() += 1;
        }
    }
    if refs.values().any(|&c| c >= 2) {
        stats.bump("docs with a type referenced from several places");
    }
    let index_of = |name: &str| names.iter().position(|x| x == name);
    let mut first_reference = Vec::new();
    let mut stack = vec![0usize];
    let mut seen = BTreeSet::from([0usize]);
    while let Some(i) = stack.pop() {
        let mut next = Vec::new();
        for (_, t) in &defs[i] {
            if let Some(j) = t.struct_base().and_then(index_of) {
                if seen.insert(j) {
                    first_reference.push(j);
                    next.push(j);
                }
            }
        }
        stack.extend(next.into_iter().rev());
    }
    assert_eq!(seen.len(), n, "every struct type is reachable from the primary type");

    let mask: u8 = rng.gen_range(0..32);
    let domain_defs: Vec<(String, Ty)> = domain_fields()
        .into_iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, (name, t))| (name.to_string(), t))
        .collect();
    match domain_defs.len() {
        0 => stats.bump("empty domains"),
        5 => stats.bump("full domains"),
        _ => {}
    }

    let mut types: Vec<(String, Vec<(String, Ty)>)> = names.iter().cloned().zip(defs).collect();
    types.push((DOMAIN.to_string(), domain_defs));
    types.shuffle(rng);

    let deps: Vec<&str> = first_reference.iter().map(|&j| names[j].as_str()).collect();
    let mut sorted = deps.clone();
    sorted.sort_unstable();
    let declared: Vec<&str> = types
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| deps.contains(n))
        .collect();
    if deps != sorted {
        stats.bump("docs whose reference order differs from alphabetical");
    }
    if declared != sorted {
        stats.bump("docs whose declaration order differs from alphabetical");
    }
    if deps != sorted && declared != sorted && declared != deps {
        stats.bump("docs with reference, declaration and alphabetical orders all different");
    }

    let mut top_order = [0, 1, 2, 3];
    top_order.shuffle(rng);
    let mut doc = Doc {
        types,
        primary: names[0].clone(),
        domain: J::Obj(Vec::new()),
        message: J::Obj(Vec::new()),
        top_order,
        type_first: rng.gen_bool(0.2),
    };
    let mut budget = MAX_VALUES;
    doc.domain = gen_value(rng, &doc, &Ty::Struct(DOMAIN.into()), &mut budget, stats)?;
    doc.message = gen_value(rng, &doc, &Ty::Struct(doc.primary.clone()), &mut budget, stats)?;
    let text = Writer::write(rng, &doc.to_json(), stats);
    if text.len() > MAX_JSON_BYTES {
        return None;
    }
    stats.max_nesting = stats.max_nesting.max(deepest);
    stats.max_types = stats.max_types.max(n + 1);
    stats.max_bytes = stats.max_bytes.max(text.len());
    Some((doc, text))
}

/// A value of type `ty`; `None` when the document's value budget runs out.
fn gen_value(rng: &mut StdRng, doc: &Doc, ty: &Ty, budget: &mut usize, stats: &mut Stats) -> Option<J> {
    *budget = budget.checked_sub(1)?;
    if !matches!(ty, Ty::Struct(_) | Ty::Array(..)) {
        stats.atomic.insert(ty.type_string());
    }
    Some(match ty {
        Ty::Bool => J::Bool(rng.gen()),
        Ty::Address => J::Str(gen_address(rng, stats)),
        Ty::Str => J::Str(gen_string(rng, stats)),
        Ty::Bytes => {
            let len = match rng.gen_range(0..10) {
                0 | 1 => 0,
                2..=6 => rng.gen_range(1..=32),
                _ => rng.gen_range(33..=100),
            };
            if len == 0 {
                stats.bump("empty bytes values");
            }
            J::Str(random_hex(rng, len))
        }
        Ty::FixedBytes(n) => J::Str(random_hex(rng, *n)),
        Ty::Uint(bits) => {
            let v = gen_uint(rng, *bits, stats);
            int_json(rng, &v, stats)
        }
        Ty::Int(bits) => {
            let v = gen_int(rng, *bits, stats);
            int_json(rng, &v, stats)
        }
        Ty::Struct(name) => {
            let mut entries = Vec::new();
            for (f, t) in doc.fields(name) {
                entries.push((f.clone(), gen_value(rng, doc, t, budget, stats)?));
            }
            // Key order in the message is free; the type fixes the hashing order.
            entries.shuffle(rng);
            J::Obj(entries)
        }
        Ty::Array(inner, len) => {
            let n = len.unwrap_or_else(|| if rng.gen_bool(0.25) { 0 } else { rng.gen_range(1..=3) });
            stats.bump(if len.is_some() {
                "fixed-size array values"
            } else {
                "dynamic array values"
            });
            if n == 0 {
                stats.bump("empty array values");
            }
            match **inner {
                Ty::Array(..) => stats.bump("array-of-arrays values"),
                Ty::Struct(_) => stats.bump("array-of-structs values"),
                _ => {}
            }
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(gen_value(rng, doc, inner, budget, stats)?);
            }
            J::Arr(items)
        }
    })
}

fn gen_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    match rng.gen_range(0..10) {
        0 => vec![0; len],
        1 => vec![0xff; len],
        _ => (0..len).map(|_| rng.gen()).collect(),
    }
}

/// `len` random bytes as [`hex_bytes`] writes them.
fn random_hex(rng: &mut StdRng, len: usize) -> String {
    let bytes = gen_bytes(rng, len);
    hex_bytes(rng, &bytes)
}

/// `0x` and the bytes in lower-case, upper-case or mixed-case hex digits.
fn hex_bytes(rng: &mut StdRng, bytes: &[u8]) -> String {
    let digits = hex::encode(bytes);
    let digits = match rng.gen_range(0..5) {
        0 => digits.to_ascii_uppercase(),
        1 => digits
            .chars()
            .map(|c| if rng.gen_bool(0.5) { c.to_ascii_uppercase() } else { c })
            .collect(),
        _ => digits,
    };
    format!("0x{digits}")
}

/// An address in lower case, upper-case digits, or EIP-55 mixed case (keyward refuses mixed
/// case with a wrong checksum).
fn gen_address(rng: &mut StdRng, stats: &mut Stats) -> String {
    let bytes = match rng.gen_range(0..20) {
        0 => [0u8; 20],
        1 => [0xff; 20],
        _ => rng.gen(),
    };
    let lower = hex::encode(bytes);
    match rng.gen_range(0..5) {
        0 | 1 => format!("0x{lower}"),
        2 => format!("0x{}", lower.to_ascii_uppercase()),
        _ => {
            stats.bump("EIP-55 checksummed addresses");
            let hash = Keccak256::digest(lower.as_bytes());
            let mixed: String = lower
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    let nibble = (hash[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0x0f;
                    if nibble >= 8 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            format!("0x{mixed}")
        }
    }
}

fn gen_string(rng: &mut StdRng, stats: &mut Stats) -> String {
    const PIECES: &[&str] = &[
        "",
        "a",
        "Hello, Bob!",
        "Ether Mail",
        "\"",
        "\\",
        "/",
        "\n",
        "\r\n",
        "\t",
        "\u{0}",
        "\u{1f}",
        "\u{7f}",
        "\u{8}\u{c}",
        "é",
        "ß",
        "中文",
        "😀",
        "🦀",
        "\u{2028}",
        "\u{2029}",
        "\u{feff}",
        "e\u{301}",
        "\u{10ffff}",
        "\u{fffd}",
        " ",
        "0x1234",
        "123",
        "true",
        "null",
        "{\"a\":1}",
    ];
    let mut s = String::new();
    if rng.gen_bool(0.02) {
        let n = rng.gen_range(200..600);
        s.extend((0..n).map(|_| char::from(rng.gen_range(b' '..=b'~'))));
    } else {
        for _ in 0..rng.gen_range(0..=5) {
            s.push_str(PIECES[rng.gen_range(0..PIECES.len())]);
        }
    }
    if !s.is_ascii() {
        stats.bump("non-ASCII strings");
    }
    s
}

/// A random integer below `2^bits`, of a random bit length.
fn random_bits(rng: &mut StdRng, bits: usize) -> BigUint {
    let len = rng.gen_range(0..=bits);
    let mut bytes: Vec<u8> = (0..len.div_ceil(8)).map(|_| rng.gen()).collect();
    if len % 8 != 0 {
        if let Some(top) = bytes.first_mut() {
            *top &= (1u8 << (len % 8)) - 1;
        }
    }
    BigUint::from_bytes_be(&bytes)
}

fn gen_uint(rng: &mut StdRng, bits: usize, stats: &mut Stats) -> BigInt {
    let max: BigInt = (BigInt::one() << bits) - 1;
    let v = match rng.gen_range(0..10) {
        0 => BigInt::zero(),
        1 => BigInt::one(),
        2 => max.clone(),
        3 => &max - 1,
        4 => BigInt::one() << (bits - 1),
        _ => return BigInt::from(random_bits(rng, bits)),
    };
    stats.bump("edge integer values");
    v
}

fn gen_int(rng: &mut StdRng, bits: usize, stats: &mut Stats) -> BigInt {
    let half = BigInt::one() << (bits - 1);
    let max: BigInt = &half - 1;
    let min = -half;
    let v = match rng.gen_range(0..12) {
        0 => BigInt::zero(),
        1 => BigInt::one(),
        2 => -BigInt::one(),
        3 => max.clone(),
        4 => min.clone(),
        5 => &min + 1,
        6 => &max - 1,
        _ => {
            let m = BigInt::from(random_bits(rng, bits - 1));
            return if rng.gen() { m } else { -m };
        }
    };
    stats.bump("edge integer values");
    v
}

/// An integer as a JSON number (only when at most 53 bits, so any JSON reader is exact), a
/// decimal string (possibly with leading zeros) or, when not negative, a `0x` hex string
/// (eth-account refuses `-0x…`, which keyward accepts).
fn int_json(rng: &mut StdRng, v: &BigInt, stats: &mut Stats) -> J {
    let small = v.magnitude().bits() <= 53;
    let choice = rng.gen_range(0..3);
    if small && choice == 0 {
        stats.bump("integers as JSON numbers");
        return J::Num(v.to_string());
    }
    if v.sign() != Sign::Minus && choice != 2 {
        stats.bump("integers as hex strings");
        let mut digits = v.magnitude().to_str_radix(16);
        if rng.gen_bool(0.3) {
            digits = digits.to_ascii_uppercase();
        }
        let zeros = if rng.gen_bool(0.1) { rng.gen_range(1..=4) } else { 0 };
        return J::Str(format!("0x{}{digits}", "0".repeat(zeros)));
    }
    stats.bump("integers as decimal strings");
    let zeros = if v.sign() != Sign::Minus && rng.gen_bool(0.1) {
        rng.gen_range(1..=4)
    } else {
        0
    };
    J::Str(format!("{}{v}", "0".repeat(zeros)))
}

// ---------------------------------------------------------------------------------------
// Walking and mutating documents
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A value in the document (under `domain` or `message`) with its type.
#[derive(Clone, Debug)]
struct Site {
    path: Vec<Seg>,
    ty: Ty,
}

fn sites(doc: &Doc) -> Vec<Site> {
    fn walk(doc: &Doc, v: &J, ty: &Ty, path: &mut Vec<Seg>, out: &mut Vec<Site>) {
        out.push(Site {
            path: path.clone(),
            ty: ty.clone(),
        });
        match (ty, v) {
            (Ty::Struct(name), J::Obj(_)) => {
                for (f, t) in doc.fields(name) {
                    if let Some(fv) = v.get(f) {
                        path.push(Seg::Key(f.clone()));
                        walk(doc, fv, t, path, out);
                        path.pop();
                    }
                }
            }
            (Ty::Array(inner, _), J::Arr(items)) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    walk(doc, item, inner, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(
        doc,
        &doc.domain,
        &Ty::Struct(DOMAIN.into()),
        &mut vec![Seg::Key("domain".into())],
        &mut out,
    );
    walk(
        doc,
        &doc.message,
        &Ty::Struct(doc.primary.clone()),
        &mut vec![Seg::Key("message".into())],
        &mut out,
    );
    out
}

/// A path as keyward's errors name it: `message.from.wallet`, `message.cc[1].name`.
fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

fn value_at<'a>(doc: &'a mut Doc, path: &[Seg]) -> &'a mut J {
    let mut cur = match path.first() {
        Some(Seg::Key(k)) if k == "domain" => &mut doc.domain,
        Some(Seg::Key(k)) if k == "message" => &mut doc.message,
        other => panic!("a site path starts at domain or message, not {other:?}"),
    };
    for seg in &path[1..] {
        cur = match (seg, cur) {
            (Seg::Key(k), J::Obj(entries)) => match entries.iter_mut().find(|(n, _)| n == k) {
                Some((_, v)) => v,
                None => panic!("site path {} names a missing key {k}", render(path)),
            },
            (Seg::Index(i), J::Arr(items)) => match items.get_mut(*i) {
                Some(v) => v,
                None => panic!("site path {} names a missing element {i}", render(path)),
            },
            _ => panic!("site path {} does not match the document", render(path)),
        };
    }
    cur
}

/// Mutations that make a valid document invalid by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mutation {
    IntegerOutOfRange,
    FixedBytesWrongLength,
    UndefinedType,
    MissingField,
    AddressWrongLength,
    FixedArrayWrongLength,
    NonHexBytes,
    SelfReferenceThroughArray,
}

const MUTATIONS: [Mutation; 8] = [
    Mutation::IntegerOutOfRange,
    Mutation::FixedBytesWrongLength,
    Mutation::UndefinedType,
    Mutation::MissingField,
    Mutation::AddressWrongLength,
    Mutation::FixedArrayWrongLength,
    Mutation::NonHexBytes,
    Mutation::SelfReferenceThroughArray,
];

/// The refusal a mutation calls for: the error variant and, where it is certain, the path.
#[derive(Debug)]
struct Expect {
    variant: &'static str,
    path: Option<String>,
}

/// A mutated document and what keyward must answer for it.
fn refused(out: Doc, variant: &'static str, path: Option<String>, what: String) -> Option<(Doc, Expect, String)> {
    Some((out, Expect { variant, path }, what))
}

fn variant(e: &Eip712Error) -> &'static str {
    match e {
        Eip712Error::TooLarge { .. } => "TooLarge",
        Eip712Error::InvalidJson { .. } => "InvalidJson",
        Eip712Error::Missing { .. } => "Missing",
        Eip712Error::UnexpectedField { .. } => "UnexpectedField",
        Eip712Error::WrongType { .. } => "WrongType",
        Eip712Error::InvalidValue { .. } => "InvalidValue",
        Eip712Error::OutOfRange { .. } => "OutOfRange",
        Eip712Error::InvalidType { .. } => "InvalidType",
        Eip712Error::UnknownType { .. } => "UnknownType",
        Eip712Error::DuplicateField { .. } => "DuplicateField",
        Eip712Error::CyclicType { .. } => "CyclicType",
        Eip712Error::LimitExceeded { .. } => "LimitExceeded",
        _ => "other",
    }
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> Option<&'a T> {
    items.choose(rng)
}

/// Applies `m` to a copy of `doc`: the mutated document, what keyward must answer, and a
/// description. `None` when `doc` has no place for this mutation.
fn mutate(rng: &mut StdRng, doc: &Doc, m: Mutation, stats: &mut Stats) -> Option<(Doc, Expect, String)> {
    let all = sites(doc);
    let mut out = doc.clone();
    let at = |site: &Site| Some(render(&site.path));
    match m {
        Mutation::IntegerOutOfRange => {
            let cands: Vec<&Site> = all
                .iter()
                .filter(|s| matches!(s.ty, Ty::Uint(_) | Ty::Int(_)))
                .collect();
            let site = *pick(rng, &cands)?;
            let v = match site.ty {
                Ty::Uint(bits) => match rng.gen_range(0..5) {
                    0 => BigInt::one() << bits,
                    1 => (BigInt::one() << bits) + BigInt::from(random_bits(rng, bits)),
                    2 => -BigInt::one(),
                    3 => -(BigInt::from(random_bits(rng, bits)) + BigInt::one()),
                    _ => (BigInt::one() << 256usize) + BigInt::from(random_bits(rng, 64)),
                },
                Ty::Int(bits) => match rng.gen_range(0..4) {
                    0 => BigInt::one() << (bits - 1),
                    1 => -(BigInt::one() << (bits - 1)) - 1,
                    2 => (BigInt::one() << bits) - 1,
                    _ => -(BigInt::one() << 256usize),
                },
                _ => return None,
            };
            let what = format!("{} = {v} ({})", render(&site.path), site.ty.type_string());
            *value_at(&mut out, &site.path) = int_json(rng, &v, stats);
            refused(out, "OutOfRange", at(site), what)
        }
        Mutation::FixedBytesWrongLength => {
            let cands: Vec<&Site> = all.iter().filter(|s| matches!(s.ty, Ty::FixedBytes(_))).collect();
            let site = *pick(rng, &cands)?;
            let Ty::FixedBytes(n) = site.ty else { return None };
            let len = loop {
                let len = [n.saturating_sub(1), n + 1, 0, 32, 33, 64][rng.gen_range(0..6)];
                if len != n {
                    break len;
                }
            };
            let what = format!("{} given {len} bytes (bytes{n})", render(&site.path));
            *value_at(&mut out, &site.path) = J::Str(random_hex(rng, len));
            refused(out, "InvalidValue", at(site), what)
        }
        Mutation::UndefinedType => {
            let structs: Vec<usize> = (0..out.types.len()).filter(|&i| out.types[i].0 != DOMAIN).collect();
            if structs.len() >= 2 && rng.gen_bool(0.5) {
                // Drop the definition of a referenced (non-primary) struct type. keyward names
                // the first referencing field, taking types in name order.
                let removable: Vec<usize> = structs
                    .iter()
                    .copied()
                    .filter(|&i| out.types[i].0 != out.primary)
                    .collect();
                let i = *pick(rng, &removable)?;
                let (gone, _) = out.types.remove(i);
                let mut by_name: Vec<&(String, Vec<(String, Ty)>)> = out.types.iter().collect();
                by_name.sort_by(|a, b| a.0.cmp(&b.0));
                let path = by_name.iter().find_map(|(name, fields)| {
                    let k = fields
                        .iter()
                        .position(|(_, t)| t.struct_base() == Some(gone.as_str()))?;
                    Some(format!("types.{name}[{k}].type"))
                });
                assert!(path.is_some(), "the removed type {gone} was referenced");
                refused(out, "UnknownType", path, format!("definition of {gone} removed"))
            } else {
                // Point one field at a type nobody defines.
                let with_fields: Vec<usize> = structs
                    .iter()
                    .copied()
                    .filter(|&i| !out.types[i].1.is_empty())
                    .collect();
                let i = *pick(rng, &with_fields)?;
                let k = rng.gen_range(0..out.types[i].1.len());
                let taken: BTreeSet<String> = out.types.iter().map(|(n, _)| n.clone()).collect();
                let undefined = format!("Undefined{}", struct_name(rng, &taken));
                let old = out.types[i].1[k].1.clone();
                let new = old.with_base(Ty::Struct(undefined));
                let what = format!(
                    "types.{}[{k}] {} -> {}",
                    out.types[i].0,
                    old.type_string(),
                    new.type_string()
                );
                out.types[i].1[k].1 = new;
                let path = Some(format!("types.{}[{k}].type", out.types[i].0));
                refused(out, "UnknownType", path, what)
            }
        }
        Mutation::MissingField => {
            let cands: Vec<&Site> = all
                .iter()
                .filter(|s| matches!(&s.ty, Ty::Struct(name) if !doc.fields(name).is_empty()))
                .collect();
            let site = *pick(rng, &cands)?;
            let J::Obj(entries) = value_at(&mut out, &site.path) else {
                return None;
            };
            let k = rng.gen_range(0..entries.len());
            let (gone, _) = entries.remove(k);
            let mut path = site.path.clone();
            path.push(Seg::Key(gone));
            let what = format!("{} removed", render(&path));
            refused(out, "Missing", Some(render(&path)), what)
        }
        Mutation::AddressWrongLength => {
            let cands: Vec<&Site> = all.iter().filter(|s| s.ty == Ty::Address).collect();
            let site = *pick(rng, &cands)?;
            let digits = [0usize, 2, 38, 39, 41, 42, 64][rng.gen_range(0..7)];
            let text: String = (0..digits)
                .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
                .collect();
            let what = format!("{} given {digits} hex digits", render(&site.path));
            *value_at(&mut out, &site.path) = J::Str(format!("0x{text}"));
            refused(out, "InvalidValue", at(site), what)
        }
        Mutation::FixedArrayWrongLength => {
            let cands: Vec<&Site> = all.iter().filter(|s| matches!(s.ty, Ty::Array(_, Some(_)))).collect();
            let site = *pick(rng, &cands)?;
            let J::Arr(items) = value_at(&mut out, &site.path) else {
                return None;
            };
            let before = items.len();
            if rng.gen_bool(0.5) {
                items.pop();
            } else {
                let first = items.first()?.clone();
                items.push(first);
            }
            let what = format!(
                "{} ({}) given {} elements instead of {before}",
                render(&site.path),
                site.ty.type_string(),
                items.len()
            );
            refused(out, "InvalidValue", at(site), what)
        }
        Mutation::NonHexBytes => {
            let cands: Vec<&Site> = all
                .iter()
                .filter(|s| matches!(s.ty, Ty::Bytes | Ty::FixedBytes(_)))
                .collect();
            let site = *pick(rng, &cands)?;
            let J::Str(s) = value_at(&mut out, &site.path) else {
                return None;
            };
            let mut digits: Vec<char> = s.strip_prefix("0x")?.chars().collect();
            let bad = ['g', 'G', 'z', 'Z', 'x', 'o', ' ', '-', '.', 'h'][rng.gen_range(0..10)];
            if digits.is_empty() {
                digits = vec![bad, bad];
            } else {
                let k = rng.gen_range(0..digits.len());
                digits[k] = bad;
            }
            *s = format!("0x{}", digits.into_iter().collect::<String>());
            let what = format!("{} = {s:?} ({})", render(&site.path), site.ty.type_string());
            refused(out, "InvalidValue", at(site), what)
        }
        Mutation::SelfReferenceThroughArray => {
            // keyward refuses every cycle, a struct reaching itself only through a (possibly
            // empty) array included. Every instance gets an empty array for the new field, so
            // nothing but the cycle is wrong.
            let structs: Vec<usize> = (0..out.types.len()).filter(|&i| out.types[i].0 != DOMAIN).collect();
            let i = *pick(rng, &structs)?;
            let name = out.types[i].0.clone();
            let mut fnames: BTreeSet<String> = out.types[i].1.iter().map(|(f, _)| f.clone()).collect();
            let field = field_name(rng, &mut fnames);
            let dims = rng.gen_range(1..=2);
            let mut ty = Ty::Array(Box::new(Ty::Struct(name.clone())), None);
            if dims == 2 {
                ty = Ty::Array(Box::new(ty), None);
            }
            let k = rng.gen_range(0..=out.types[i].1.len());
            let what = format!("types.{name}[{k}] {field}: {}", ty.type_string());
            out.types[i].1.insert(k, (field.clone(), ty));
            for site in all.iter().filter(|s| s.ty == Ty::Struct(name.clone())) {
                if let J::Obj(entries) = value_at(&mut out, &site.path) {
                    let at = rng.gen_range(0..=entries.len());
                    entries.insert(at, (field.clone(), J::Arr(Vec::new())));
                }
            }
            refused(out, "CyclicType", Some(format!("types.{name}[{k}].type")), what)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn generated_valid_documents_hash_like_eth_account() {
    let started = Instant::now();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    let docs: Vec<String> = (0..VALID_DOCS).map(|i| gen_doc(&mut rng, i, &mut stats).1).collect();
    let generated = started.elapsed();

    let ours: Vec<Result<String, Eip712Error>> = docs.iter().map(|d| keyward_answer(d)).collect();
    let refused: Vec<String> = ours
        .iter()
        .zip(&docs)
        .enumerate()
        .filter_map(|(i, (r, d))| {
            r.as_ref()
                .err()
                .map(|e| format!("document #{i}: keyward refused: {e}\n{d}"))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "seed {seed} (replay with KEYWARD_EIP712_SEED={seed}): keyward refused {} of {} generated valid \
         documents; the first:\n{}",
        refused.len(),
        docs.len(),
        refused.iter().take(3).cloned().collect::<Vec<_>>().join("\n\n")
    );

    // The generator covers what it claims to (a gap here is a generator bug, not keyward's).
    assert_eq!(
        stats.atomic.len(),
        all_atomic().len(),
        "seed {seed}: atomic types never hashed: {:?}",
        all_atomic()
            .iter()
            .map(Ty::type_string)
            .filter(|t| !stats.atomic.contains(t))
            .collect::<Vec<_>>()
    );
    for key in [
        "docs with a type referenced from several places",
        "docs whose reference order differs from alphabetical",
        "docs whose declaration order differs from alphabetical",
        "docs with reference, declaration and alphabetical orders all different",
        "empty struct types",
        "empty domains",
        "full domains",
        "fixed-size array values",
        "dynamic array values",
        "empty array values",
        "array-of-arrays values",
        "array-of-structs values",
        "edge integer values",
        "integers as JSON numbers",
        "integers as decimal strings",
        "integers as hex strings",
        "empty bytes values",
        "EIP-55 checksummed addresses",
        "non-ASCII strings",
        "JSON escapes written",
    ] {
        assert!(stats.count(key) > 0, "seed {seed}: the generator produced no {key}");
    }

    let theirs_started = Instant::now();
    let Some(theirs) = eth_account_batch(seed, &docs) else {
        return;
    };
    let theirs_took = theirs_started.elapsed();

    let mut disagreements = Vec::new();
    for (i, ((ours, theirs), doc)) in ours.iter().zip(&theirs).zip(&docs).enumerate() {
        let ours = ours.as_ref().map(String::as_str).unwrap_or("error");
        if ours != theirs {
            disagreements.push(format!(
                "document #{i}:\n  keyward:     {ours}\n  eth-account: {theirs}\n  document: {doc}"
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "seed {seed} (replay with KEYWARD_EIP712_SEED={seed}): keyward and eth-account disagree on {} of {} \
         valid documents; the first:\n{}",
        disagreements.len(),
        docs.len(),
        disagreements.iter().take(3).cloned().collect::<Vec<_>>().join("\n\n")
    );

    println!(
        "seed {seed}: {} valid documents, identical digests from keyward and eth-account \
         (generated in {generated:.2?}, eth-account batch {theirs_took:.2?}, total {:.2?})",
        docs.len(),
        started.elapsed()
    );
    println!(
        "  largest: {} types, nesting {}, {} bytes; atomic types hashed: {}/{}",
        stats.max_types,
        stats.max_nesting,
        stats.max_bytes,
        stats.atomic.len(),
        all_atomic().len()
    );
    for (k, v) in &stats.counts {
        println!("  {k}: {v}");
    }
}

#[test]
fn invalid_mutations_are_refused_by_keyward() {
    let started = Instant::now();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    let bases: Vec<Doc> = (0..MUTATION_BASE_DOCS)
        .map(|i| {
            let (doc, text) = gen_doc(&mut rng, i, &mut stats);
            if let Err(e) = keyward_answer(&text) {
                panic!("seed {seed}: keyward refused base document #{i}: {e}\n{text}");
            }
            doc
        })
        .collect();

    let mut mutants: Vec<(Mutation, String)> = Vec::new();
    let mut failures = Vec::new();
    for m in MUTATIONS {
        let mut made = 0;
        for _ in 0..MUTATIONS_PER_KIND * 50 {
            if made == MUTATIONS_PER_KIND {
                break;
            }
            let base = &bases[rng.gen_range(0..bases.len())];
            let Some((doc, expect, what)) = mutate(&mut rng, base, m, &mut stats) else {
                continue;
            };
            made += 1;
            let text = Writer::write(&mut rng, &doc.to_json(), &mut stats);
            match TypedData::from_slice(text.as_bytes()) {
                Ok(td) => failures.push(format!(
                    "{m:?} ({what}): keyward ACCEPTED it, digest 0x{}\n  document: {text}",
                    hex::encode(td.signing_hash())
                )),
                Err(e) => {
                    let path_ok = expect.path.as_deref().is_none_or(|p| p == e.path());
                    if variant(&e) != expect.variant || !path_ok {
                        failures.push(format!(
                            "{m:?} ({what}): keyward refused it, but not as expected ({} at {}): {e}\n  \
                             document: {text}",
                            expect.variant,
                            expect.path.as_deref().unwrap_or("any path")
                        ));
                    }
                }
            }
            mutants.push((m, text));
        }
        assert_eq!(
            made, MUTATIONS_PER_KIND,
            "seed {seed}: the base documents offered too few places for {m:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "seed {seed} (replay with KEYWARD_EIP712_SEED={seed}): {} of {} invalid mutations were not refused as \
         expected; the first:\n{}",
        failures.len(),
        mutants.len(),
        failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n\n")
    );
    println!(
        "seed {seed}: keyward refused all {} invalid mutations ({} kinds x {MUTATIONS_PER_KIND}) of {} base \
         documents as expected",
        mutants.len(),
        MUTATIONS.len(),
        bases.len()
    );

    let texts: Vec<String> = mutants.iter().map(|(_, t)| t.clone()).collect();
    if let Some(theirs) = eth_account_batch(seed, &texts) {
        let mut by_kind: BTreeMap<Mutation, (usize, usize)> = BTreeMap::new();
        for ((m, _), answer) in mutants.iter().zip(&theirs) {
            let entry = by_kind.entry(*m).or_default();
            if answer.starts_with("error:") {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
        println!("  eth-account on the same mutations (refused / accepted):");
        for (m, (refused, accepted)) in by_kind {
            println!("    {m:?}: {refused} / {accepted}");
        }
    }
    println!("  total {:.2?}", started.elapsed());
}
