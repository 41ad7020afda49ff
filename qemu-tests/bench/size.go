package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/host/image"
	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// sizeTarget is the compressed image with the default modules (virtio,
// dm-crypt, ext4, plus the AES-NI drivers) and the default compression,
// in bytes: 4 MB, on every kernel the suite boots.
const sizeTarget = 4_000_000

// benchSize compares our image with Debian's own initramfs-tools images
// for the same kernel (with cryptsetup-initramfs, and with clevis for
// network unlock, the nearest thing to what unlockrd does), and times
// `mkunlockrd build`, on each kernel. The Debian images are built once in
// a debootstrap chroot of the kernel's release and cached machine-wide
// (see debianImages).
func benchSize(ctx context.Context, r *report) error {
	runs := r.runs(3, 1)
	bins, err := harness.Binaries(ctx)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "unlockrd-bench-size-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for _, kname := range r.kernels {
		k, err := harness.KernelNamed(kname)
		if err != nil {
			return err
		}
		if err := sizeKernel(ctx, r, bins, k, dir, runs); err != nil {
			return fmt.Errorf("%s: %w", kname, err)
		}
	}
	return nil
}

func sizeKernel(ctx context.Context, r *report, bins *harness.Bins, k harness.KernelFiles, dir string, runs int) error {
	// The key-server values only have to pass validation.
	cfg := harness.ImageConfig{
		URLs:   []string{"https://keys.example.net:8443/v1/keys/{host}"},
		Pins:   []string{"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="},
		Kernel: k.Name,
	}
	ours := map[image.Compression]int64{}
	var oursTimes []time.Duration
	var c *image.Contents
	for _, comp := range bootCompressions {
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
			st, err := os.Stat(img)
			if err != nil {
				return err
			}
			ours[comp] = st.Size()
			if comp == image.DefaultCompression {
				oursTimes = append(oursTimes, took)
				if c, err = image.ReadFile(img); err != nil {
					return err
				}
			}
		}
	}
	initBin, _ := c.File(layout.InitPath)
	r.printf("%s (%s): unlockrd image, default modules %v -> %d modules:", k.Name, k.Release, harness.DefaultModules, len(c.Modules))
	for _, comp := range bootCompressions {
		name := string(comp) + ":"
		if comp == image.DefaultCompression {
			name = string(comp) + " (default):"
		}
		r.printf("  %-44s %s", name, mb(ours[comp]))
	}
	r.printf("  %-44s %s uncompressed, init %s of it", "", mb(c.Uncompressed), mb(int64(len(initBin))))
	r.printf("  mkunlockrd build (%s): %s over %d run(s)", image.DefaultCompression, summarize(oursTimes), len(oursTimes))

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
		took := "mkinitramfs time not recorded"
		if d.img.Seconds > 0 {
			took = fmt.Sprintf("mkinitramfs %.1fs", d.img.Seconds)
		}
		r.printf("  Debian %s %s: %s, %d modules, %s; ours is %.1f%% of it (1/%.1f)",
			deb.Suite, d.name, mb(d.img.Size), d.img.Modules, took,
			100*float64(our)/float64(d.img.Size), float64(d.img.Size)/float64(our))
	}
	r.printf("  (%s; Debian's defaults MODULES=most, COMPRESS=zstd, plus CRYPTSETUP=y; cached in %s)", deb.Versions, deb.dir)

	r.target(fmt.Sprintf("size (%s): default image ≤ 4 MB", k.Name), our <= sizeTarget,
		fmt.Sprintf("%.2f MB with %s (xz %.2f MB, zstd %.2f MB, gzip %.2f MB); 1/%.1f of Debian's initramfs-tools+cryptsetup+clevis (%.1f MB)",
			float64(our)/1e6, image.DefaultCompression, float64(ours[image.Xz])/1e6, float64(ours[image.Zstd])/1e6, float64(ours[image.Gzip])/1e6,
			float64(deb.Clevis.Size)/float64(our), float64(deb.Clevis.Size)/1e6))
	return nil
}

func mb(n int64) string {
	return fmt.Sprintf("%d bytes (%.2f MB, %.2f MiB)", n, float64(n)/1e6, float64(n)/(1<<20))
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
