# Sourced by demo.sh and test.sh: install what building Baton needs, if it is missing.
#
# - A Rust toolchain at least as new as the workspace's rust-version (Cargo.toml). Debian's
#   own rustc is older than the crates need (bookworm ships 1.63, trixie 1.85), so the
#   toolchain comes from rustup: a rustup already installed is used (its ~/.cargo/bin put on
#   PATH), else rustup is installed (stable, with rustfmt and clippy).
# - protoc and protobuf's well-known types, from Debian's packages (etcd-client's build
#   compiles etcd's protos).

step() { printf '\n==> %s\n' "$*" >&2; }

# Install Debian packages (as root, or through sudo).
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "error: these Debian packages are missing: $*; install them as root (apt-get install $*), or install sudo" >&2
      exit 1
    fi
    sudo="sudo"
  fi
  step "installing $* from Debian's packages"
  $sudo apt-get update -qq
  # Through env: sudo resets the environment, which would drop DEBIAN_FRONTEND.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# The rust-version the workspace declares, e.g. 1.88.
required_rust() {
  sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n 1
}

# True if `rustc` is on PATH and at least the required version.
rust_new_enough() {
  local have want
  have=$(rustc --version 2>/dev/null | awk '{print $2}') || return 1
  [ -n "$have" ] || return 1
  want=$(required_rust)
  [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n 1)" = "$want" ]
}

ensure_rust() {
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    case ":$PATH:" in
      *":$HOME/.cargo/bin:"*) ;;
      *) export PATH="$HOME/.cargo/bin:$PATH" ;;
    esac
  fi
  if rust_new_enough && command -v cargo >/dev/null; then
    return
  fi
  if command -v rustup >/dev/null; then
    step "updating the Rust toolchain (rustup, stable; Baton needs $(required_rust))"
    rustup toolchain install stable --profile minimal --component rustfmt,clippy
    rustup default stable
  else
    step "installing the Rust toolchain (rustup, stable; Baton needs $(required_rust))"
    command -v curl >/dev/null || apt_install curl ca-certificates
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal --component rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! rust_new_enough; then
    echo "error: rustc $(rustc --version 2>/dev/null) is older than $(required_rust)" >&2
    exit 1
  fi
}

# Packages the build needs, for the caller to install along with its own.
build_packages() {
  # A C compiler, linker and libc headers: rustc links with `cc`, and `ring` (TLS) compiles
  # C. build-essential, since gcc alone only recommends libc6-dev.
  { command -v cc >/dev/null && [ -e /usr/include/stdio.h ]; } || echo build-essential
  command -v protoc >/dev/null || echo protobuf-compiler
  # etcd-client's protos import protobuf's well-known types, which protobuf-compiler only
  # recommends (and --no-install-recommends skips): they come with libprotobuf-dev.
  [ -e /usr/include/google/protobuf/descriptor.proto ] || echo libprotobuf-dev
}
