#!/usr/bin/env bash
# Build the Debian package debvisor-daemon_<version>_<arch>.deb (as root or not, Debian 12).
#
#   scripts/package.sh [--out DIR] [--profile PROFILE] [--prebuilt DIR] [--version VERSION]
#                      [--fast] [--no-lintian]
#
# --out       where the .deb lands (default: target/debian)
# --profile   cargo profile of the binaries (default: release, with LTO)
# --prebuilt  package debvisord/debvisorctl already built in DIR instead of running cargo
# --version   package version instead of the one in packaging/debian/changelog (a new
#             changelog entry is added in the staged copy; the tree is not changed)
# --fast      compress the .deb with gzip -1 instead of xz (the test's large debug binaries)
# Then runs lintian on the result (errors fail the build). The build's output, cargo's
# progress included, is shown as it comes and kept in <out>/package-build.log.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
out="$src/target/debian"
profile=release
prebuilt=""
version=""
lint=1
compress=""
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --prebuilt) prebuilt="$(cd "$2" && pwd)"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --fast) compress="-Zgzip -z1"; shift ;;
    --no-lintian) lint=0; shift ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# dpkg-buildpackage wants debian/ in the current directory and writes the .deb next to it:
# stage packaging/debian as <stage>/debvisor-daemon/debian.
stage="$(mktemp -d "$out/.stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/debvisor-daemon"
cp -r "$src/packaging/debian" "$stage/debvisor-daemon/debian"
rm -f "$stage/debvisor-daemon/debian/README.md"
if [[ -n "$version" ]]; then
  {
    printf 'debvisor-daemon (%s) bookworm; urgency=medium\n\n' "$version"
    printf '  * Rebuild of the working tree.\n\n'
    printf ' -- DebVisor developers <dev@debvisor.invalid>  %s\n\n' "$(date -R)"
    cat "$src/packaging/debian/changelog"
  } >"$stage/debvisor-daemon/debian/changelog"
fi

export DEBVISOR_SRC="$src" DEBVISOR_PROFILE="$profile" DEBVISOR_PREBUILT="$prebuilt"
export DEBVISOR_DEB_COMPRESSION="$compress"
# The build's output (cargo's progress included: a release build takes minutes) goes to the
# terminal as it comes and to a log, which is kept next to the packages when the build fails.
log="$out/package-build.log"
if [[ -n "$prebuilt" ]]; then what="the binaries in $prebuilt"; else what="cargo profile $profile"; fi
echo "package.sh: building from $what; log: $log"
if ! (cd "$stage/debvisor-daemon" && dpkg-buildpackage --build=binary --no-sign -d 2>&1) | tee "$log" >&2; then
  echo "package.sh: dpkg-buildpackage failed; the whole log is kept in $log" >&2
  exit 1
fi
ver="$(dpkg-parsechangelog -l "$stage/debvisor-daemon/debian/changelog" -S Version)"
arch="$(dpkg --print-architecture)"
deb="debvisor-daemon_${ver}_${arch}.deb"
mv "$stage/$deb" "$out/$deb"
echo "package.sh: built $out/$deb"
if ((lint)); then
  # --fail-on error: warnings are reported, errors fail.
  lintian --fail-on error --display-info --tag-display-limit 0 "$out/$deb"
  echo "package.sh: lintian found no errors"
fi
