#!/usr/bin/env bash
# Runs one coverage-guided fuzz target (fuzz/fuzz_targets/TARGET.rs) with cargo-fuzz and
# libFuzzer on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags
# cargo-fuzz passes, and --sanitizer none drops AddressSanitizer (which needs a nightly
# standard library; keyward forbids unsafe code, so ASan would add little). Overflow checks
# stay on everywhere, debug assertions in keyward (fuzz/Cargo.toml's profile). The run is
# one process (libFuzzer's -jobs=1), niced, and stops after SECONDS (default 60) or MAX_RUNS
# executions (default 10^7), whichever comes first; it ends with libFuzzer's final stats
# (stat::number_of_executed_units is the execution count).
#
# The corpus grows in fuzz/work/TARGET (not committed), seeded from fuzz/corpus/TARGET;
# crashes land in fuzz/artifacts/TARGET. `scripts/fuzz.sh cmin TARGET` minimises the working
# corpus back into fuzz/corpus/TARGET.
#
# Usage: scripts/fuzz.sh TARGET [SECONDS] [libFuzzer flags...]
#        scripts/fuzz.sh cmin TARGET
#        scripts/fuzz.sh list
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
# --codegen-units 16: keyward's dependency tree is large; one unit per crate builds much slower.
# -O: debug assertions and overflow checks come from fuzz/Cargo.toml's profile (on in keyward,
# overflow checks everywhere) instead of everywhere: k256's debug-assertion field arithmetic
# would otherwise dominate every signing target.
build=(--sanitizer none --codegen-units 16 -O)

case "${1:-}" in
  "" | -h | --help)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
  list)
    cargo fuzz list
    exit 0
    ;;
  cmin)
    target=${2:?usage: scripts/fuzz.sh cmin TARGET}
    work=fuzz/work/$target
    [ -d "$work" ] || { echo "no working corpus $work: run the target first" >&2; exit 1; }
    fresh=$(mktemp -d)
    nice -n 10 cargo fuzz run "${build[@]}" "$target" "$fresh" "$work" fuzz/corpus/"$target" -- -merge=1
    rm -rf fuzz/corpus/"$target"
    mv "$fresh" fuzz/corpus/"$target"
    chmod 755 fuzz/corpus/"$target"
    echo "fuzz/corpus/$target: $(ls fuzz/corpus/"$target" | wc -l) files"
    exit 0
    ;;
esac

target=$1
seconds=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))
[ -f fuzz/fuzz_targets/"$target".rs ] || { echo "no target $target (scripts/fuzz.sh list)" >&2; exit 1; }
mkdir -p fuzz/work/"$target" fuzz/corpus/"$target"
exec nice -n 10 cargo fuzz run "${build[@]}" "$target" fuzz/work/"$target" fuzz/corpus/"$target" -- \
  -max_total_time="$seconds" -runs="${MAX_RUNS:-10000000}" -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 "$@"
