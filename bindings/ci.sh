#!/usr/bin/env bash
# The bindings in CI (called by .ci/run): builds keepwire-ffi and the pinned
# uniffi-bindgen, regenerates the committed Swift and Kotlin bindings and
# fails on any difference, installs the Python package into a fresh
# virtualenv (`pip install ./bindings/python`, maturin) and runs its pytest
# suite against a real `keepwire serve`, then compiles and runs the Kotlin
# JVM tests. Installs what it needs itself: a venv from PyPI, the Kotlin
# compiler from npm (`kotlin-compiler`), JNA from Debian (`libjna-java`).
#
# Usage: bash bindings/ci.sh [verifier|swift|python|kotlin ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTUP_TOOLCHAIN=stable
export CARGO_TERM_COLOR=never
ROOT=$PWD
WORK="$ROOT/target/bindings"
KOTLIN_VERSION=2.4.20
mkdir -p "$WORK"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(verifier swift python kotlin)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
started=$SECONDS
step() { echo "== bindings: $* (+$((SECONDS - started))s)"; }

step "cargo build: keepwire-ffi, uniffi-bindgen, the keepwire binary"
# Built one by one so their features match what maturin builds (no rebuild there).
cargo build --locked -p keepwire-ffi
cargo build --locked -p uniffi-bindgen
cargo build --locked -p keepwire --bin keepwire
# A copy: maturin's build below replaces target/debug's.
mkdir -p "$WORK/lib"
cp "$ROOT/target/debug/libkeepwire_ffi.so" "$WORK/lib/"
LIB="$WORK/lib/libkeepwire_ffi.so"
BINDGEN="$ROOT/target/debug/uniffi-bindgen"
KEEPWIRE_BIN="$ROOT/target/debug/keepwire"
export KEEPWIRE_BIN

if want verifier; then
    # Mobile builds verify wss:// with the platform's verifier: on Linux it
    # must trust a given private root and refuse an unknown one, like the
    # default (rustls-native-certs) build.
    step "the platform-verifier feature: wss:// with a private root, refused without it"
    cargo test --locked -q -p keepwire-client --features platform-verifier --test tests wss
fi

generate() { # LANGUAGE OUT_DIR
    rm -rf "$2"
    "$BINDGEN" generate --library "$LIB" --language "$1" --no-format --out-dir "$2" >/dev/null
}

if want swift || want kotlin; then
    step "generated bindings are current (Swift and Kotlin are committed)"
    generate swift bindings/swift/generated
    generate kotlin bindings/kotlin/generated
    if ! git diff --exit-code --stat -- bindings/swift/generated bindings/kotlin/generated ||
        [ -n "$(git status --porcelain -- bindings/swift/generated bindings/kotlin/generated)" ]; then
        git status --short -- bindings/swift/generated bindings/kotlin/generated
        echo "the committed bindings are stale: run bash bindings/ci.sh swift and commit bindings/*/generated"
        exit 1
    fi
fi

if want python; then
    step "Python: pip install ./bindings/python in a fresh virtualenv"
    rm -rf "$WORK/venv"
    python3 -m venv "$WORK/venv"
    # A dev build reuses what cargo built above; users get a release build.
    MATURIN_PEP517_ARGS="--profile dev" "$WORK/venv/bin/pip" install --quiet \
        --disable-pip-version-check "./bindings/python[test]"
    step "Python: pytest against a real relay"
    (cd "$WORK" && "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
        "$ROOT/bindings/python/tests")
fi

if want kotlin; then
    step "Kotlin: compiler from npm, JNA from Debian"
    if [ ! -f /usr/share/java/jna.jar ]; then
        if ! dpkg -s libjna-java >/dev/null 2>&1; then
            apt-get update -qq >/dev/null
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjna-java >/dev/null
    fi
    KLIB="$WORK/npm/node_modules/kotlin-compiler/lib"
    if [ ! -f "$KLIB/kotlin-compiler.jar" ]; then
        npm install --silent --no-audit --no-fund --prefix "$WORK/npm" "kotlin-compiler@$KOTLIN_VERSION"
    fi
    JNA=/usr/share/java/jna.jar
    CP="$JNA:$KLIB/kotlinx-coroutines-core-jvm.jar"
    step "Kotlin: compile the generated bindings and the tests"
    rm -rf "$WORK/kotlin" && mkdir -p "$WORK/kotlin"
    java -cp "$KLIB/kotlin-compiler.jar" org.jetbrains.kotlin.cli.jvm.K2JVMCompiler \
        -no-reflect -jvm-target 17 -nowarn -cp "$CP" -d "$WORK/kotlin/test.jar" \
        bindings/kotlin/generated/dev/keepwire/keepwire_ffi.kt bindings/kotlin/KeepwireTest.kt
    step "Kotlin: JVM tests against a real relay"
    java -Djna.library.path="$WORK/lib" \
        -cp "$WORK/kotlin/test.jar:$KLIB/kotlin-stdlib.jar:$CP" \
        KeepwireTestKt "$KEEPWIRE_BIN" "$WORK/kotlin/run"
fi

step "done"
