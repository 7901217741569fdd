# Sourced by the scripts: `require CMD PACKAGE` installs a missing Debian package when it can
# (as root), or stops with the exact command to run.
require() {
    require_that "command -v $1" "$1" "$2"
}

# `require_module MODULE PACKAGE`: the same for a module of Debian's own python3 (a pyenv or
# venv python3 on PATH does not see apt's packages).
require_module() {
    require_that "/usr/bin/python3 -c 'import $1'" "python3 module $1" "$2"
}

# `require_that CHECK WHAT PACKAGE`: runs CHECK; when it fails, installs PACKAGE and checks again.
require_that() {
    local check=$1 what=$2 pkg=$3
    eval "$check" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing $pkg (needed for $what)..." >&2
        if [ -z "${WEIR_APT_UPDATED:-}" ]; then
            apt-get update -qq >&2
            WEIR_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2
        eval "$check" >/dev/null 2>&1 && return 0
    fi
    echo "missing $what; install it with:" >&2
    echo "    sudo apt-get install -y $pkg" >&2
    exit 1
}

# Pingora's zlib-ng is built with cmake; rustfmt and clippy come with the toolchain.
require_build_tools() {
    require cmake cmake
    for component in rustfmt clippy; do
        if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
            rustup component add "$component"
        fi
    done
}

# The packages of a release build, always built together, by scripts/build-release and
# scripts/pgo-train alike. Cargo unifies dependency features over the packages of one build,
# features enter each crate's hash, and the PGO profile names code by those hashes: a build of
# the whole workspace turns on features only the tests want (rustix's, url's, bitflags' "std"),
# and the profile silently stops applying to most of Pingora and its dependencies (22% more
# instructions a request, docs/bench/rounds.md, fifteenth round).
release_packages=(-p weir-gateway -p weir-sidecar -p weir-bench)
