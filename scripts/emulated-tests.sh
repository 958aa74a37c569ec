#!/usr/bin/env bash
# Runs the kernel crate's tests on an emulated CPU, for SIMD tiers this host
# lacks (AVX-512 with VNNI on an AVX2-only machine): the static test binaries
# boot as the init of a small Linux under Bochs, whose CPU models execute
# AVX-512. Slow (minutes) and needs root (a Debian chroot holds the emulator),
# so it is a manual check, not part of scripts/test.sh.
#
#   scripts/emulated-tests.sh [CPU_MODEL]   (default tigerlake: AVX-512 F/BW/VL/VNNI)
#
# Needs: Debian with apt, root. Fetches Bochs 3.0 and a Linux kernel from
# Debian 13 (trixie) into .cache/emulator once; Debian 12's Bochs 2.7 reports
# an AVX-512 register layout that Linux rejects, and Linux 6.1 does not boot
# on Bochs' AVX-512 models, which is why both come from Debian 13.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root_dir=$(pwd)
model=${1:-tigerlake}
cache="$root_dir/.cache/emulator"
chroot_dir="$cache/trixie"
work="$cache/run"
timeout_s=${FLEXSERVE_EMULATED_TIMEOUT:-1800}

if [ "$(id -u)" != 0 ]; then
  echo "emulated-tests: needs root (debootstrap, chroot, device nodes)" >&2
  exit 1
fi

missing=()
for tool in debootstrap xorriso cpio gcc; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -f /usr/lib/ISOLINUX/isolinux.bin ] || missing+=(isolinux)
[ -f /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || missing+=(syslinux-common)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq debootstrap xorriso cpio gcc libc6-dev isolinux syslinux-common >/dev/null
fi

if [ ! -x "$chroot_dir/usr/bin/bochs-bin" ]; then
  echo "== preparing a Debian 13 chroot with Bochs (once, a few minutes)"
  rm -rf "$chroot_dir"
  mkdir -p "$cache"
  debootstrap --variant=minbase trixie "$chroot_dir.tmp" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 || {
    echo "emulated-tests: debootstrap failed, see $cache/debootstrap.log" >&2
    exit 1
  }
  chroot "$chroot_dir.tmp" apt-get install -y -qq --no-install-recommends \
    bochs bochs-x bochsbios vgabios xvfb xauth >"$cache/bochs-install.log" 2>&1 || {
    echo "emulated-tests: installing Bochs failed, see $cache/bochs-install.log" >&2
    exit 1
  }
  mv "$chroot_dir.tmp" "$chroot_dir"
fi

kernel="$cache/vmlinuz"
if [ ! -f "$kernel" ]; then
  echo "== fetching Debian 13's cloud kernel"
  rm -rf "$cache/kernel" && mkdir -p "$cache/kernel"
  chroot "$chroot_dir" bash -c 'cd /tmp && rm -f linux-image-*.deb && apt-get download \
    "$(apt-cache depends linux-image-cloud-amd64 | sed -n "s/.*Depends: //p" | head -1)"' >/dev/null
  dpkg-deb -x "$chroot_dir"/tmp/linux-image-*.deb "$cache/kernel"
  cp "$cache"/kernel/boot/vmlinuz-* "$kernel.tmp" && mv "$kernel.tmp" "$kernel"
fi

echo "== building static test binaries of flexserve-quant"
target_dir="$root_dir/target/static-tests"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
  cargo test --release -p flexserve-quant --target x86_64-unknown-linux-gnu --no-run \
  --message-format=json 2>/dev/null >"$cache/build.json"
mapfile -t binaries < <(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
        print(msg["executable"])
' "$cache/build.json")
if [ ${#binaries[@]} -eq 0 ]; then
  echo "emulated-tests: no test binaries were built; run the cargo command by hand to see why" >&2
  exit 1
fi

echo "== packing ${#binaries[@]} test binaries into a boot image"
rm -rf "$work" && mkdir -p "$work/initrd"/{dev,proc,sys,tests} "$work/iso/isolinux"
gcc -O2 -static -o "$work/initrd/init" scripts/emulator/init.c
mknod "$work/initrd/dev/console" c 5 1
for bin in "${binaries[@]}"; do
  name=$(basename "$bin" | sed 's/-[0-9a-f]*$//')
  cp "$bin" "$work/initrd/tests/$name"
  strip "$work/initrd/tests/$name"
done
(cd "$work/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"$work/iso/initrd.gz")
cp "$kernel" "$work/iso/vmlinuz"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$work/iso/isolinux/"
cat >"$work/iso/isolinux/isolinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.gz console=ttyS0,115200 loglevel=3 panic=-1 nokaslr mitigations=off tsc=reliable init_on_alloc=0 idle=halt lsm=capability
EOF
xorriso -as mkisofs -quiet -o "$work/boot.iso" -b isolinux/isolinux.bin -c isolinux/boot.cat \
  -no-emul-boot -boot-load-size 4 -boot-info-table "$work/iso" 2>/dev/null

# The chroot sees the run directory at /run-emulated.
inside=/run-emulated
mkdir -p "$chroot_dir$inside"
mountpoint -q "$chroot_dir$inside" || mount --bind "$work" "$chroot_dir$inside"
for fs in proc dev sys; do
  mountpoint -q "$chroot_dir/$fs" || mount --bind "/$fs" "$chroot_dir/$fs"
done
cleanup() {
  pkill -f "bochs-bin .*$inside/bochsrc" 2>/dev/null || true
  for fs in "$inside" /sys /dev /proc; do umount -l "$chroot_dir$fs" 2>/dev/null || true; done
}
trap cleanup EXIT

cat >"$work/bochsrc" <<EOF
memory: guest=512, host=512
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
cpu: model=$model, count=1, ips=400000000, reset_on_triple_fault=0
pci: enabled=1, chipset=i440fx
ata0-master: type=cdrom, path=$inside/boot.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$inside/serial.out
display_library: x
log: $inside/bochs.log
panic: action=fatal
error: action=ignore
info: action=ignore
clock: sync=none, time0=local
speaker: enabled=0
EOF
echo c >"$work/debugger.rc"

echo "== booting the emulated $model (about a minute to boot, then the tests)"
: >"$work/serial.out"
chroot "$chroot_dir" bash -c "cd $inside && timeout $timeout_s xvfb-run -a bochs -q -f bochsrc -rc debugger.rc \
  >bochs.stdout 2>&1 </dev/null" &
emulator=$!
waited=0
while kill -0 "$emulator" 2>/dev/null; do
  if grep -aq 'EMULATED: done' "$work/serial.out"; then
    sleep 2
    break
  fi
  sleep 5
  waited=$((waited + 5))
  if [ $((waited % 60)) = 0 ]; then
    echo "   ... ${waited}s: $(grep -a 'EMULATED: running' "$work/serial.out" | tail -1 | sed 's/EMULATED: //')"
  fi
done
cleanup
grep -a -E '^(EMULATED|test result|test .* FAILED|kernels compared on)' "$work/serial.out" || true
summary=$(grep -a 'EMULATED: done' "$work/serial.out" || true)
if [ -z "$summary" ]; then
  echo "emulated-tests: the emulated machine stopped before the tests finished; see $work/serial.out" >&2
  exit 1
fi
case "$summary" in
  *", 0 failed"*) echo "emulated-tests: all passed on the emulated $model" ;;
  *) echo "emulated-tests: failures on the emulated $model (full log: $work/serial.out)" >&2; exit 1 ;;
esac
