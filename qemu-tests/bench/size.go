package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/host/image"
	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// sizeTarget is the compressed image with the default modules (virtio,
// dm-crypt, ext4), in bytes: 3 MB.
const sizeTarget = 3_000_000

// debianSuite and debianMirror are where the reference chroot comes from:
// the release whose kernel the tests boot. BENCH_DEBIAN_MIRROR overrides
// the mirror.
const (
	debianSuite  = "bookworm"
	debianMirror = "http://deb.debian.org/debian"
)

// benchSize compares our image with Debian's own initramfs-tools image for
// the same kernel (with cryptsetup-initramfs, and with clevis for network
// unlock, the nearest thing to what unlockrd does), and times `mkunlockrd
// build`. The Debian images are built in a throwaway debootstrap chroot
// under .cache/bench-debian/<release>, and cached there with their build
// times: only the first run pays for the download and mkinitramfs.
func benchSize(ctx context.Context, r *report) error {
	runs := 3
	if r.quick {
		runs = 1
	}
	bins, err := harness.Binaries(ctx)
	if err != nil {
		return err
	}
	k, err := harness.Kernel()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "unlockrd-bench-size-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// The key-server values only have to pass validation.
	cfg := harness.ImageConfig{
		URLs: []string{"https://keys.example.net:8443/v1/keys/{host}"},
		Pins: []string{"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="},
	}

	ours := map[image.Compression]int64{}
	var oursTimes []time.Duration
	for _, comp := range []image.Compression{image.DefaultCompression, image.Zstd} {
		n := 1
		if comp == image.DefaultCompression {
			n = runs
		}
		for i := 0; i < n; i++ {
			start := time.Now()
			img, err := harness.BuildImage(ctx, bins, cfg, dir, "--compress", string(comp))
			took := time.Since(start)
			if err != nil {
				return err
			}
			if comp == image.DefaultCompression {
				oursTimes = append(oursTimes, took)
			}
			st, err := os.Stat(img)
			if err != nil {
				return err
			}
			ours[comp] = st.Size()
		}
	}
	c, err := image.ReadFile(filepath.Join(dir, "initramfs.img"))
	if err != nil {
		return err
	}
	initBin, _ := c.File(layout.InitPath)
	r.printf("unlockrd image, default modules %v -> %d modules for %s:", harness.DefaultModules, len(c.Modules), k.Release)
	r.printf("  %-44s %s", "xz (default):", mb(ours[image.DefaultCompression]))
	r.printf("  %-44s %s", "zstd (--compress zstd):", mb(ours[image.Zstd]))
	r.printf("  %-44s %s uncompressed, init %s of it", "", mb(c.Uncompressed), mb(int64(len(initBin))))
	r.printf("  mkunlockrd build (xz): %s over %d run(s)", summarize(oursTimes), len(oursTimes))

	deb, err := debianImages(ctx, k, r)
	if err != nil {
		return fmt.Errorf("Debian's initramfs-tools images: %w", err)
	}
	our := ours[image.DefaultCompression]
	for _, d := range []struct {
		name string
		img  debianImage
	}{
		{"initramfs-tools + cryptsetup-initramfs", deb.Cryptsetup},
		{"initramfs-tools + cryptsetup-initramfs + clevis", deb.Clevis},
	} {
		r.printf("Debian %s %s: %s, %d modules, mkinitramfs %.1fs; ours is %.1f%% of it (1/%.1f)",
			debianSuite, d.name, mb(d.img.Size), d.img.Modules, d.img.Seconds,
			100*float64(our)/float64(d.img.Size), float64(d.img.Size)/float64(our))
	}
	r.printf("(%s; Debian's defaults MODULES=most, COMPRESS=zstd, plus CRYPTSETUP=y; cached in %s)", deb.Versions, deb.dir)

	r.target("size: default image ≤ 3 MB", our <= sizeTarget,
		fmt.Sprintf("%.2f MB with xz (%.2f MB with zstd); 1/%.1f of Debian's initramfs-tools+cryptsetup (%.1f MB)",
			float64(our)/1e6, float64(ours[image.Zstd])/1e6, float64(deb.Cryptsetup.Size)/float64(our), float64(deb.Cryptsetup.Size)/1e6))
	return nil
}

func mb(n int64) string {
	return fmt.Sprintf("%d bytes (%.2f MB, %.2f MiB)", n, float64(n)/1e6, float64(n)/(1<<20))
}

// debianImage is one cached Debian image and how it was made.
type debianImage struct {
	Size    int64   `json:"size"`
	Modules int     `json:"modules"`
	Seconds float64 `json:"mkinitramfs_seconds"`
}

// debianCache is .cache/bench-debian/<release>/images.json.
type debianCache struct {
	Release    string      `json:"release"`
	Versions   string      `json:"versions"`
	Cryptsetup debianImage `json:"cryptsetup"`
	Clevis     debianImage `json:"clevis"`
	dir        string
}

// chrootScript runs one step in the reference chroot, inside a private
// mount namespace (unshare -m): /proc, /sys and /dev are mounted for the
// step only and vanish with it, whatever happens.
const chrootScript = `set -euo pipefail
root=$1 rel=$2 step=$3
shift 3
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
ch() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
case $step in
prepare)
	ch depmod "$rel"
	if ch dpkg-query -W -f='${Status}' clevis-initramfs 2>/dev/null | grep -q 'install ok installed'; then
		ch apt-get purge -y -qq clevis-initramfs >/dev/null
	fi ;;
mkinitramfs)
	ch mkinitramfs -o "$1" "$rel" 2>&1 | grep -v -e "Couldn't determine root device" -e 'setupcon is missing' >&2 || true
	test -s "$root$1" ;;
install)
	cp /etc/resolv.conf "$root/etc/resolv.conf"
	ch apt-get update -qq
	ch apt-get install -y -qq --no-install-recommends "$@" >/dev/null ;;
list)
	ch lsinitramfs "$1" ;;
versions)
	ch dpkg-query -W -f='${Package} ${Version}\n' "$@" ;;
esac
`

// debianImages returns the cached Debian images for the kernel, building
// them first when the cache lacks them.
func debianImages(ctx context.Context, k harness.KernelFiles, r *report) (*debianCache, error) {
	root, err := harness.ModuleRoot()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(root, ".cache", "bench-debian", k.Release)
	meta := filepath.Join(dir, "images.json")
	if b, err := os.ReadFile(meta); err == nil {
		var c debianCache
		if err := json.Unmarshal(b, &c); err == nil && c.Release == k.Release && c.Clevis.Size > 0 {
			c.dir = dir
			return &c, nil
		}
	}
	r.printf("building Debian's images in a %s chroot under %s (once; cached) ...", debianSuite, dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "build.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	r.printf("  (log: %s)", logf.Name())
	runLogged := func(ctx context.Context, name string, args ...string) error {
		return runLogged(ctx, logf, name, args...)
	}
	if err := runLogged(ctx, filepath.Join(root, "qemu-tests", "setup", "install-deps.sh"), "debootstrap"); err != nil {
		return nil, err
	}
	chroot := filepath.Join(dir, "chroot")
	done := filepath.Join(chroot, ".unlockrd-bench-complete")
	if _, err := os.Stat(done); err != nil {
		os.RemoveAll(chroot)
		mirror := debianMirror
		if m := os.Getenv("BENCH_DEBIAN_MIRROR"); m != "" {
			mirror = m
		}
		start := time.Now()
		if err := runLogged(ctx, "debootstrap", "--variant=minbase",
			"--include=initramfs-tools,cryptsetup-initramfs,zstd", debianSuite, chroot, mirror); err != nil {
			return nil, err
		}
		if err := os.WriteFile(done, nil, 0o644); err != nil {
			return nil, err
		}
		r.printf("  debootstrap took %s", time.Since(start).Round(time.Second))
	}
	// The kernel's modules and config, as its package would install them.
	mods := filepath.Join(chroot, "lib", "modules", k.Release)
	os.RemoveAll(mods)
	if err := os.MkdirAll(filepath.Dir(mods), 0o755); err != nil {
		return nil, err
	}
	if err := runLogged(ctx, "cp", "-a", k.Modules, mods); err != nil {
		return nil, err
	}
	if err := runLogged(ctx, "cp", filepath.Join(filepath.Dir(k.Modules), "config"), filepath.Join(chroot, "boot", "config-"+k.Release)); err != nil {
		return nil, err
	}
	// No encrypted root is configured in the chroot: without CRYPTSETUP=y
	// cryptsetup-initramfs would leave cryptsetup out.
	hook := filepath.Join(chroot, "etc", "cryptsetup-initramfs", "conf-hook")
	if b, err := os.ReadFile(hook); err != nil {
		return nil, err
	} else if !strings.Contains(string(b), "\nCRYPTSETUP=y\n") {
		if err := os.WriteFile(hook, append(b, "\nCRYPTSETUP=y\n"...), 0o644); err != nil {
			return nil, err
		}
	}
	step := func(args ...string) ([]byte, error) {
		cmd := exec.CommandContext(ctx, "unshare", append([]string{"-m", "--propagation", "private", "bash", "-c", chrootScript, "chroot-step", chroot, k.Release}, args...)...)
		cmd.Stderr = logf
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("chroot step %s: %w (see %s)", args[0], err, logf.Name())
		}
		return out, nil
	}
	build := func(name, check string) (debianImage, error) {
		inChroot := "/tmp/" + name
		start := time.Now()
		if _, err := step("mkinitramfs", inChroot); err != nil {
			return debianImage{}, err
		}
		secs := time.Since(start).Seconds()
		list, err := step("list", inChroot)
		if err != nil {
			return debianImage{}, err
		}
		if !strings.Contains(string(list), check) {
			return debianImage{}, fmt.Errorf("%s lacks %s: not the image to compare with", name, check)
		}
		img := debianImage{Seconds: secs, Modules: strings.Count(string(list), ".ko\n")}
		if err := os.Rename(filepath.Join(chroot, inChroot), filepath.Join(dir, name)); err != nil {
			return debianImage{}, err
		}
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return debianImage{}, err
		}
		img.Size = st.Size()
		return img, nil
	}
	c := &debianCache{Release: k.Release, dir: dir}
	if _, err := step("prepare"); err != nil {
		return nil, err
	}
	if c.Cryptsetup, err = build("initramfs-tools-cryptsetup.img", "sbin/cryptsetup\n"); err != nil {
		return nil, err
	}
	if _, err := step("install", "clevis-initramfs", "clevis-luks"); err != nil {
		return nil, err
	}
	if c.Clevis, err = build("initramfs-tools-clevis.img", "bin/clevis\n"); err != nil {
		return nil, err
	}
	v, err := step("versions", "initramfs-tools", "cryptsetup-initramfs", "clevis-initramfs")
	if err != nil {
		return nil, err
	}
	c.Versions = strings.Join(strings.Fields(strings.ReplaceAll(string(v), "\n", ", ")), " ")
	c.Versions = strings.TrimSuffix(c.Versions, ",")
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(meta, b, 0o644); err != nil {
		return nil, err
	}
	return c, nil
}

// runLogged runs a setup command, its output going to log.
func runLogged(ctx context.Context, log *os.File, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		var ee *exec.Error
		if errors.As(err, &ee) {
			return fmt.Errorf("%s: %w (run as root on Debian: make deps)", name, err)
		}
		return fmt.Errorf("%s %s: %w (see %s)", name, strings.Join(args, " "), err, log.Name())
	}
	return nil
}
