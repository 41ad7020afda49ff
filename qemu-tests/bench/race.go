package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/host/image"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// raceTarget: our default image spends at most this fraction of the time
// Debian's initramfs-tools + cryptsetup + clevis image spends in the
// initramfs, in the same run.
const raceTarget = 1.0 / 6

// benchRace boots our default image and Debian's own initramfs-tools
// image with cryptsetup-initramfs and clevis-initramfs, alternately, in
// the same VM settings (same kernel, -cpu max, memory, TCG, user net),
// each unlocking the same layout over the network: data + swap LUKS2
// (aes-xts) with an unencrypted root and the test init. Ours fetches the
// key from unlockrd-keyserver; Debian's asks Debian's tangd through
// clevis. Both are timed from the kernel's "Run /init" to the test init's
// first reading of the clock.
func benchRace(ctx context.Context, r *report) error {
	runs := r.runs(5, 2)
	o, err := newOurs(ctx, "race", r.nolock)
	if err != nil {
		return err
	}
	defer o.Stop()
	for _, kname := range r.kernels {
		k, err := harness.KernelNamed(kname)
		if err != nil {
			return err
		}
		deb, err := debianImages(ctx, k, r)
		if err != nil {
			return fmt.Errorf("Debian's initramfs-tools images for %s: %w", k.Release, err)
		}
		img, err := o.image(ctx, kname, image.DefaultCompression)
		if err != nil {
			return err
		}
		if err := raceKernel(ctx, r, o, k, img, deb, runs); err != nil {
			return fmt.Errorf("%s: %w", kname, err)
		}
	}
	return nil
}

func raceKernel(ctx context.Context, r *report, o *ours, k harness.KernelFiles, img string, deb *debianCache, runs int) error {
	dir := o.dir // Debian's logs and disk copies go beside ours
	tangLog, err := os.Create(filepath.Join(dir, "tang-"+k.Name+".log"))
	if err != nil {
		return err
	}
	defer tangLog.Close()
	tang, err := startTang(ctx, deb, tangLog)
	if err != nil {
		return err
	}
	defer tang.Stop()
	sum := sha256.Sum256([]byte(deb.Hello))
	debHello := hex.EncodeToString(sum[:])
	// ip= in initramfs-tools(7)'s full form, naming the interface (the
	// NIC's predictable name under QEMU's default PCI layout): clevis's
	// local-top script takes field 6 of ip= as the interface to wait for,
	// and with the short ip=dhcp that is "dhcp" (cut prints a line without
	// the delimiter whole), so it gives up and never configures the network.
	debOpts := harness.VMOptions{
		Name:       "bench-debian",
		Kernel:     k.Vmlinuz,
		Initramfs:  deb.path(deb.Clevis.File),
		Append:     []string{"quiet", "root=/dev/vda1", "ip=:::::ens3:dhcp"},
		SerialLog:  filepath.Join(dir, "debian-"+k.Name+".log"),
		Concurrent: r.nolock,
	}
	r.printf("%s (%s): ours (%s) vs Debian %s's %s, %d boots each, alternated", k.Name, k.Release, image.DefaultCompression, deb.Suite, deb.Versions, runs)
	var oursIn, debIn []time.Duration
	for i := 0; i < runs; i++ {
		b, err := o.boot(ctx, k, img)
		if err != nil {
			return fmt.Errorf("ours, boot %d: %w", i+1, err)
		}
		oursIn = append(oursIn, b.inInitramfs)
		r.printf("  boot %d ours:   %.3fs in the initramfs (Run /init at %.3fs)", i+1, b.inInitramfs.Seconds(), b.rep.RunInit.Seconds())
		d, err := measureBoot(ctx, dir, deb.path(deb.Disk), debOpts, debHello)
		if err != nil {
			return fmt.Errorf("Debian's, boot %d: %w", i+1, err)
		}
		if _, ok := d.rep.DMTable("swap"); !ok {
			return fmt.Errorf("Debian's, boot %d: no swap mapping after the initramfs (dm: %v)", i+1, d.rep.DM)
		}
		debIn = append(debIn, d.inInitramfs)
		r.printf("  boot %d Debian: %.3fs in the initramfs (Run /init at %.3fs)", i+1, d.inInitramfs.Seconds(), d.rep.RunInit.Seconds())
	}
	so, sd := summarize(oursIn), summarize(debIn)
	st, err := os.Stat(img)
	if err != nil {
		return err
	}
	ratio := so.median.Seconds() / sd.median.Seconds()
	r.printf("  ours:   %s; image %s", so, mb(st.Size()))
	r.printf("  Debian: %s; image %s", sd, mb(deb.Clevis.Size))
	r.printf("  ratio of medians ours/Debian: %.3f (1/%.1f); image size ratio 1/%.1f", ratio, 1/ratio, float64(deb.Clevis.Size)/float64(st.Size()))
	r.target(fmt.Sprintf("race (%s): ours ≤ 1/6 of initramfs-tools+clevis in the initramfs", k.Name), ratio <= raceTarget,
		fmt.Sprintf("%.2fs vs %.2fs, 1/%.1f (medians of %d alternated boots)", so.median.Seconds(), sd.median.Seconds(), 1/ratio, runs))
	return nil
}
