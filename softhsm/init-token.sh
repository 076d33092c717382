#!/usr/bin/env bash
# Initialise keyward's SoftHSM token and key-encryption key without a
# terminal: a container's one-shot init job, a CI job, a fresh host.
#
#   softhsm/init-token.sh --config FILE --so-pin-file FILE
#                         [--token-dir DIR --softhsm-conf FILE] [--keyward BIN]
#
#   --config FILE        keyward.toml (env KEYWARD_CONFIG). Its [hsm] section
#                        names the module, the token label and the user PIN
#                        (`pin_file`, mode 0600; or `pin_env`).
#   --so-pin-file FILE   the security officer PIN, mode 0600 or stricter
#                        (env KEYWARD_SO_PIN_FILE).
#   --token-dir DIR      SoftHSM's token folder, created mode 0700 if missing
#                        (env KEYWARD_TOKEN_DIR). Needs --softhsm-conf.
#   --softhsm-conf FILE  where to write softhsm2.conf from the template next
#                        to this script, unless it exists (env SOFTHSM2_CONF).
#                        keyward.toml's `hsm.softhsm_conf` should name it;
#                        when set, that key wins over SOFTHSM2_CONF.
#   --keyward BIN        the keyward binary (env KEYWARD_BIN; default: PATH).
#
# Idempotent: a second run finds the token and the KEK, says so, exits 0.
#
# PINs never appear on the command line of any process, nor in the
# environment: this script checks the PIN files' modes and hands their paths
# to `keyward init --init-token`, which reads them into memory and calls
# C_InitToken / C_InitPIN itself. (softhsm2-util --init-token cannot be used:
# it takes --pin and --so-pin as arguments, which `ps` shows to every user.)
set -euo pipefail

die() {
  printf 'init-token: %s\n' "$*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
}

config="${KEYWARD_CONFIG:-}"
so_pin_file="${KEYWARD_SO_PIN_FILE:-}"
token_dir="${KEYWARD_TOKEN_DIR:-}"
softhsm_conf="${SOFTHSM2_CONF:-}"
keyward="${KEYWARD_BIN:-keyward}"

while (($# > 0)); do
  case "$1" in
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --so-pin-file) so_pin_file="${2:?--so-pin-file needs a value}"; shift 2 ;;
    --token-dir) token_dir="${2:?--token-dir needs a value}"; shift 2 ;;
    --softhsm-conf) softhsm_conf="${2:?--softhsm-conf needs a value}"; shift 2 ;;
    --keyward) keyward="${2:?--keyward needs a value}"; shift 2 ;;
    -h | --help) usage ;;
    *) die "unknown argument: $1 (PINs are never arguments: use --so-pin-file)" ;;
  esac
done

[[ -n "$config" ]] || die "--config (or KEYWARD_CONFIG) is required"
[[ -f "$config" ]] || die "config $config: no such file"
[[ -n "$so_pin_file" ]] || die "--so-pin-file (or KEYWARD_SO_PIN_FILE) is required"

# A PIN file must be a regular file that only its owner may read or write
# (0600 or 0400). Symbolic links are followed (Kubernetes Secret volumes are
# links): the file read is what counts. Its content is never read here.
check_pin_file() {
  local file="$1" mode
  [[ -f "$file" ]] || die "PIN file $file: no such regular file"
  mode="$(stat -L -c '%a' -- "$file")"
  if (((8#$mode & 8#077) != 0)); then
    die "PIN file $file has mode $mode: group or others may access it; chmod 600 it"
  fi
}
check_pin_file "$so_pin_file"

if [[ -n "$token_dir" ]]; then
  [[ -n "$softhsm_conf" ]] || die "--token-dir needs --softhsm-conf (where to write softhsm2.conf)"
  [[ "$token_dir" != *$'\n'* ]] || die "--token-dir must not contain a newline"
  mkdir -p -- "$token_dir"
  chmod 0700 -- "$token_dir"
  if [[ -e "$softhsm_conf" ]]; then
    echo "softhsm2.conf $softhsm_conf exists; kept"
  else
    template="$(dirname -- "${BASH_SOURCE[0]}")/softhsm2.conf.template"
    [[ -f "$template" ]] || die "template $template: no such file"
    text="$(<"$template")"
    tmp="$softhsm_conf.tmp.$$"
    (umask 077 && printf '%s\n' "${text//@TOKENDIR@/"$token_dir"}" >"$tmp")
    mv -- "$tmp" "$softhsm_conf"
    echo "softhsm2.conf $softhsm_conf written (tokendir $token_dir)"
  fi
fi
if [[ -n "$softhsm_conf" ]]; then
  export SOFTHSM2_CONF="$softhsm_conf"
fi

# Creates the token unless one has the label (it never re-initialises one),
# then the KEK and issuer keys unless present, then the store's schema.
exec "$keyward" init --config "$config" --init-token --so-pin-file "$so_pin_file"
