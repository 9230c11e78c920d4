#!/bin/sh
# Runs the Java binding's JUnit 5 tests through Maven, offline, against Debian's packaged
# repository. Usage: mvn_test.sh BUILD_DIR   (BUILD_DIR = <cmake build>/bindings/java, which holds
# gen/ from SWIG and libdefkv_jni.so). Exits 77 (CTest: skipped) with a reason when Maven or the
# Debian plugin packages are missing.
set -u
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: mvn_test.sh BUILD_DIR}
repo=/usr/share/maven-repo
skip() { echo "SKIPPED: $*"; exit 77; }
command -v mvn >/dev/null 2>&1 || skip "mvn not found (apt-get install maven)"
for d in org/apache/maven/plugins/maven-compiler-plugin/3.10.1 org/apache/maven/plugins/maven-resources-plugin/3.3.0 \
         org/apache/maven/plugins/maven-surefire-plugin/2.22.3 org/apache/maven/surefire/surefire-junit-platform/2.22.3 \
         org/junit/jupiter/junit-jupiter-engine/5.9.2; do
  [ -d "$repo/$d" ] || skip "$repo/$d missing (apt-get install libmaven-compiler-plugin-java libmaven-resources-plugin-java libsurefire-java junit5)"
done
[ -d "$build/gen/org/defkv/internal" ] || { echo "error: $build/gen/org/defkv/internal missing (build target defkv_java first)"; exit 1; }
log="$build/mvn-test.log"
mvn -B -o -Daether.offline.protocols=file -s "$here/settings-debian.xml" -f "$here/pom.xml" \
  -Dmaven.repo.local="$build/m2" -Ddefkv.build.dir="$build/mvn-target" \
  -Ddefkv.gen.dir="$build/gen" -Ddefkv.lib.dir="$build" -DforkCount=0 test >"$log" 2>&1
rc=$?
cat "$log"
[ $rc -eq 0 ] || { echo "error: mvn exited with $rc"; exit 1; }
grep -Eq '^\[INFO\] Tests run: [1-9][0-9]*, Failures: 0, Errors: 0, Skipped: 0$' "$log" \
  || { echo "error: no passing test summary in mvn output"; exit 1; }
