#!/usr/bin/env bash
# Build Hyper-DERP (C++23, io_uring DERP relay) as a benchmark peer, from local git mirrors.
#
# GitHub is not reachable here, so every repository comes from a bare mirror under
# $HYPERDERP_MIRRORS (default /work/.mirror, laid out as owner+name/repo, as the search
# tool's `fetch github:owner/name` leaves them), and CMake's FetchContent is pointed at
# local checkouts with FETCHCONTENT_SOURCE_DIR_<NAME>; nothing upstream is patched.
#
#   bash bench/build_hyperderp.sh            # build (or reuse) the binary, print its path
#   HYPERDERP_JOBS=1 bash bench/build_hyperderp.sh
#
# Result: $(go env GOPATH)/peers/hyperderp/hyper-derp and COMMITS (what was built from).
# Idempotent: a second run with the same pins only checks the binary and exits. Sources and
# the CMake build tree live under $(go env GOPATH)/peers/hyperderp/work, so an interrupted
# build resumes. Not part of CI: a cold build takes ~15-25 min on this 2-core host.
#
# How it differs from upstream's own build (and why):
#   - clang-19 with libc++-19: upstream needs <print> (C++23), which gcc 12's libstdc++ lacks.
#   - `-include exception`: Debian's asio 1.22 uses std::exception_ptr without including
#     <exception>, which libc++ does not pull in transitively.
#   - liburing 2.9 built from source and linked statically: Debian 12 ships 2.3, too old.
#   - einheit (the optional operator CLI, a private repository) is replaced by a stub
#     target through upstream's own EINHEIT_SOURCE_DIR hook.
#   - only the `hyper-derp` server target is built (no tests, tools, SDK, client or BPF).
#   - spdlog v1.13.0 and msgpack-c cpp-6.1.0: the newest tags in the mirrors (upstream pins
#     v1.15.2 and cpp-6.1.1, which the mirrors do not have).
set -euo pipefail

die() { echo "build_hyperderp: $*" >&2; exit 1; }

# ---- pins: repository (owner+name) and commit --------------------------------------------
HD_REPO=hyper-derp+Hyper-DERP;  HD_REV=6137cb31c62a393b0bdf4c73b79bbc91e41c6ead   # main, "daemon-0.2.2" merge
SPDLOG_REPO=gabime+spdlog;      SPDLOG_REV=7c02e204c92545f869e2f04edaab1f19fe8b19fd # v1.13.0
MSGPACK_REPO=msgpack+msgpack-c; MSGPACK_REV=8c602e8579c7e7d65d6f9c6703c9699db3fb0488 # cpp-6.1.0
RYML_REPO=biojppm+rapidyaml;    RYML_REV=e65999dc4d65368e1b3eb770e28d775885b0f525   # v0.8.0
C4CORE_REPO=biojppm+c4core;     C4CORE_REV=6c876ec05a4387c25068cdbd58724828dad1d217 # rapidyaml v0.8.0's ext/c4core
C4CMAKE_REPO=biojppm+cmake;     C4CMAKE_REV=b8e95acb1bdd564e47ac57d903a483604d90cbfa # c4core's cmake
DEBUGBREAK_REPO=biojppm+debugbreak; DEBUGBREAK_REV=328e4abca3384cbd0a69e70f263cc7b2794bff09 # c4core's src/c4/ext/debugbreak
FASTFLOAT_REPO=fastfloat+fast_float; FASTFLOAT_REV=d28a3320c2de0963b6e469b8ca3bbc36496de684 # c4core's src/c4/ext/fast_float
CROW_REPO=CrowCpp+Crow;         CROW_REV=537b44d3d3faa88095885c876aad2059d3315e93   # v1.3.0.0
URING_REPO=axboe+liburing;      URING_REV=08468cc3830185c75f9e7edefd88aa01e5c2f8ab  # liburing-2.9
CPM_REPO=cpm-cmake+CPM.cmake;   CPM_REV=0bc73f41cedb561efe5643826891dcb705c680de # v0.40.2 (Crow's cmake/CPM.cmake downloads it)
CPM_SHA256=c8cdc32c03816538ce22781ed72964dc864b2a34a310d3b7104812a5ca2d835d # Crow's CPM_HASH_SUM

DEB_PACKAGES=(clang-19 lld-19 libc++-19-dev libc++abi-19-dev cmake make git
              libssl-dev libasio-dev libsodium-dev libbpf-dev libzmq3-dev cppzmq-dev
              libcli11-dev libmnl-dev libelf-dev zlib1g-dev pkg-config)

MIRRORS=${HYPERDERP_MIRRORS:-/work/.mirror}
JOBS=${HYPERDERP_JOBS:-2}
command -v go >/dev/null || die "go is not on PATH (needed for \$(go env GOPATH))"
GOPATH_DIR=$(go env GOPATH); GOPATH_DIR=${GOPATH_DIR%%:*}
DEST=${HYPERDERP_DEST:-$GOPATH_DIR/peers/hyperderp}
WORK=$DEST/work
SRC=$WORK/src
BIN=$DEST/hyper-derp

pins() {
  for v in HD SPDLOG MSGPACK RYML C4CORE C4CMAKE DEBUGBREAK FASTFLOAT CROW URING CPM; do
    r=${v}_REPO; c=${v}_REV; echo "${!r/+//} ${!c}"
  done
  echo "compiler $(clang++-19 --version 2>/dev/null | head -1)"
}

# ---- already built with these pins? ---------------------------------------------------------
if [[ -x $BIN && -f $DEST/COMMITS ]] && diff -q <(pins) "$DEST/COMMITS" >/dev/null 2>&1 \
   && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

# ---- Debian packages ------------------------------------------------------------------------
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "missing Debian packages (run as root, or install them): ${missing[*]}"
  echo "build_hyperderp: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
    || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends "${missing[@]}" >&2; } \
    || die "apt-get install ${missing[*]} failed"
fi

# ---- sources from the mirrors ---------------------------------------------------------------
# checkout DIR OWNER+NAME COMMIT: a non-bare clone of the mirror at COMMIT (kept if already there).
checkout() {
  local dir=$1 repo=$2 rev=$3 git_dir=$MIRRORS/$2/repo
  if [[ -d $dir/.git || -f $dir/.git ]] && [[ $(git -C "$dir" rev-parse HEAD 2>/dev/null) == "$rev" ]]; then
    return 0
  fi
  [[ -d $git_dir ]] || die "no mirror of ${repo/+//} at $git_dir (fetch it with the search tool: fetch github:${repo/+//})"
  git --git-dir="$git_dir" cat-file -e "$rev^{commit}" 2>/dev/null \
    || die "mirror $git_dir lacks commit $rev (re-fetch github:${repo/+//})"
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  git clone -q --no-checkout "$git_dir" "$dir" || die "git clone $git_dir failed"
  git -C "$dir" -c advice.detachedHead=false checkout -q --detach "$rev" || die "checkout $rev in $dir failed"
}

mkdir -p "$SRC"
checkout "$SRC/hyper-derp" $HD_REPO $HD_REV
checkout "$SRC/spdlog" $SPDLOG_REPO $SPDLOG_REV
checkout "$SRC/msgpack-c" $MSGPACK_REPO $MSGPACK_REV
checkout "$SRC/crow" $CROW_REPO $CROW_REV
checkout "$SRC/liburing" $URING_REPO $URING_REV
checkout "$SRC/rapidyaml" $RYML_REPO $RYML_REV
# rapidyaml's submodules, and c4core's, at the commits their trees record
checkout "$SRC/rapidyaml/ext/c4core" $C4CORE_REPO $C4CORE_REV
checkout "$SRC/rapidyaml/ext/c4core/cmake" $C4CMAKE_REPO $C4CMAKE_REV
checkout "$SRC/rapidyaml/ext/c4core/src/c4/ext/debugbreak" $DEBUGBREAK_REPO $DEBUGBREAK_REV
checkout "$SRC/rapidyaml/ext/c4core/src/c4/ext/fast_float" $FASTFLOAT_REPO $FASTFLOAT_REV

# einheit stub: upstream's fetch.cmake only requires a target named `einheit`
mkdir -p "$WORK/einheit-stub"
cat >"$WORK/einheit-stub/CMakeLists.txt" <<'EOF'
# Stand-in for einheit-cli (Hyper-DERP's optional operator CLI, not needed to relay DERP).
add_custom_target(einheit)
EOF

# ---- liburing 2.9, static -------------------------------------------------------------------
URING_PREFIX=$WORK/liburing-install
if [[ ! -f $URING_PREFIX/lib/liburing.a || ! -f $URING_PREFIX/.rev-$URING_REV ]]; then
  echo "build_hyperderp: building liburing 2.9" >&2
  rm -rf "$URING_PREFIX"
  ( cd "$SRC/liburing" \
    && ./configure --prefix="$URING_PREFIX" --cc=clang-19 --cxx=clang++-19 >&2 \
    && nice -n 10 make -C src -j"$JOBS" >&2 \
    && make -C src install >&2 ) || die "liburing build failed (see the output above)"
  touch "$URING_PREFIX/.rev-$URING_REV"
fi

# ---- hyper-derp -------------------------------------------------------------------------------
BUILD=$WORK/build
mkdir -p "$BUILD/cmake"
# Crow includes CPM.cmake, which it downloads unless the file with the expected hash is
# already there. The release asset is the tagged cmake/CPM.cmake with its version filled in.
CPM_FILE=$BUILD/cmake/CPM_0.40.2.cmake
if ! echo "$CPM_SHA256  $CPM_FILE" | sha256sum -c --status 2>/dev/null; then
  [[ -d $MIRRORS/$CPM_REPO/repo ]] || die "no mirror of ${CPM_REPO/+//} at $MIRRORS/$CPM_REPO/repo (fetch github:${CPM_REPO/+//})"
  git --git-dir="$MIRRORS/$CPM_REPO/repo" show "$CPM_REV:cmake/CPM.cmake" \
    | sed -e 's/1.0.0-development-version/0.40.2/g' >"$CPM_FILE" || die "cannot read CPM.cmake from the mirror"
  echo "$CPM_SHA256  $CPM_FILE" | sha256sum -c --status \
    || die "CPM.cmake made from the mirror does not have Crow's expected sha256 $CPM_SHA256"
fi
echo "build_hyperderp: configuring (log: $BUILD/configure.log)" >&2
cmake -S "$SRC/hyper-derp" -B "$BUILD" -G "Unix Makefiles" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19 \
  -DCMAKE_CXX_FLAGS="-stdlib=libc++ -include exception" \
  -DCMAKE_EXE_LINKER_FLAGS="-stdlib=libc++" \
  -DBUILD_TESTING=OFF \
  -DCLANG_BPF="$(command -v clang-19)" \
  -DURING_LIB="$URING_PREFIX/lib/liburing.a" -DURING_INCLUDE_DIR="$URING_PREFIX/include" \
  -DFETCHCONTENT_FULLY_DISCONNECTED=ON \
  -DFETCHCONTENT_SOURCE_DIR_SPDLOG="$SRC/spdlog" \
  -DFETCHCONTENT_SOURCE_DIR_MSGPACK-CXX="$SRC/msgpack-c" \
  -DFETCHCONTENT_SOURCE_DIR_RYML="$SRC/rapidyaml" \
  -DFETCHCONTENT_SOURCE_DIR_CROW="$SRC/crow" \
  -DEINHEIT_SOURCE_DIR="$WORK/einheit-stub" \
  >"$BUILD/configure.log" 2>&1 \
  || { tail -30 "$BUILD/configure.log" >&2; die "cmake configure failed (full log: $BUILD/configure.log)"; }

echo "build_hyperderp: compiling hyper-derp with $JOBS job(s) at nice 10 (log: $BUILD/build.log)" >&2
nice -n 10 make -C "$BUILD" -j"$JOBS" hyper-derp >"$BUILD/build.log" 2>&1 \
  || { grep -m20 -E "error|Error" "$BUILD/build.log" >&2; die "compile failed (full log: $BUILD/build.log)"; }

install -m 0755 "$BUILD/hyper-derp" "$BIN.new" && mv -f "$BIN.new" "$BIN"
"$BIN" --version >/dev/null 2>&1 || die "$BIN was built but does not run (--version failed)"
pins >"$DEST/COMMITS"
echo "$BIN"
