package qemutests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// The real-OS tests install unlockrd as Debian's packages into a
// debootstrapped Debian root (systemd, udev, PostgreSQL; built once and
// cached by qemu-tests/setup/debian-root.sh), install Debian's kernel
// package so that unlockrd's kernel hook builds the image, and boot that
// kernel and image: the initramfs unlocks the data volume (PostgreSQL's)
// and swap, systemd takes over, and a check unit reports on the console.
// Then a newer kernel package is installed through the hook (first with a
// broken configuration, which must fail and leave the old image alone) and
// the root boots again. The same boots check the unlockrd-keyserver
// package: systemd runs it from its unit, the test fetches a key from it
// through QEMU's port forwarding, and systemd-analyze rates the unit.

// Both run in parallel with each other: one prepares its root (dpkg in a
// chroot, disk images) while the other's VM runs (VMs take turns through
// the harness's machine-wide lock). Both boot again after the kernel
// upgrade (the second boot adds about a minute and a half each).
func TestRealOSDebian12(t *testing.T) { t.Parallel(); testRealOS(t, "debian12") }
func TestRealOSDebian13(t *testing.T) { t.Parallel(); testRealOS(t, "debian13") }

// realOSPrefix starts every line the check unit prints.
const realOSPrefix = "REALOS: "

func testRealOS(t *testing.T, name string) {
	ctx, cancel := context.WithTimeout(t.Context(), 25*time.Minute)
	defer cancel()
	if os.Geteuid() != 0 {
		t.Fatalf("the real-OS test needs root (debootstrap, chroot, file ownership in the root): run make test as root")
	}
	top, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if out, err := exec.CommandContext(ctx, filepath.Join(top, "qemu-tests/setup/debian-root.sh"), name).CombinedOutput(); err != nil {
		t.Fatalf("debian-root.sh %s: %v\n%s", name, err, out)
	} else if len(out) > 0 {
		t.Logf("%s", out)
	}
	t.Logf("%s root ready in %s", name, time.Since(start).Round(time.Second))
	cache := filepath.Join(cacheBase(), "roots", name)
	kernels, err := filepath.Glob(filepath.Join(cache, "kernels", "*.deb"))
	if err != nil || len(kernels) != 2 {
		t.Fatalf("%s: want two kernel packages, have %v (%v)", cache, kernels, err)
	}
	sortVersions(kernels)
	oldDeb, newDeb := kernels[0], kernels[1]

	// The host's key server for the boot, with the VM enrolled.
	if err := os.MkdirAll(filepath.Join(top, ".cache"), 0o755); err != nil {
		t.Fatal(err)
	}
	work, err := os.MkdirTemp(filepath.Join(top, ".cache"), "realos-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	uuid := harness.RandomUUID()
	e, err := harness.Enroll(ctx, work, uuid)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := e.Serve(ctx, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)

	debs := filepath.Join(work, "debs")
	if out, err := exec.CommandContext(ctx, filepath.Join(top, "cmd/debian/build.sh"), e.Bins.Dir, debs).CombinedOutput(); err != nil {
		t.Fatalf("cmd/debian/build.sh: %v\n%s", err, out)
	}
	pkgs, _ := filepath.Glob(filepath.Join(debs, "*.deb"))
	if len(pkgs) != 2 {
		t.Fatalf("build.sh made %v, want unlockrd and unlockrd-keyserver", pkgs)
	}

	root := filepath.Join(work, "root")
	start = time.Now()
	if out, err := exec.CommandContext(ctx, "cp", "-a", filepath.Join(cache, "root"), root).CombinedOutput(); err != nil {
		t.Fatalf("copy the cached root: %v\n%s", err, out)
	}
	r := &chroot{t: t, ctx: ctx, dir: root}
	for _, p := range append(pkgs, oldDeb, newDeb) {
		r.copyIn(p, "/tmp/"+filepath.Base(p))
	}
	r.run("dpkg", "-i", "/tmp/"+filepath.Base(pkgs[0]), "/tmp/"+filepath.Base(pkgs[1]))
	if out := r.run("dpkg-query", "-W", "-f", "${Provides} ${Conflicts}", "unlockrd"); out != "linux-initramfs-tool linux-initramfs-tool" {
		t.Errorf("unlockrd provides/conflicts %q, want linux-initramfs-tool both", out)
	}

	cfg := harness.ImageConfig{URLs: []string{srv.GuestURL()}, Pins: []string{srv.Pin}, AttemptTimeout: "30s"}
	r.write("/etc/unlockrd/unlockrd.yaml", cfg.YAML(), 0o644)
	r.stageOS(uuid)
	ksToken, ksPin := r.stageKeyServer(e.Bins.KeyServer)

	// Debian's kernel package, installed with dpkg: its postinst runs
	// /etc/kernel/postinst.d, where unlockrd's hook builds the image.
	oldVer := kernelRelease(t, oldDeb)
	newVer := kernelRelease(t, newDeb)
	out := r.run("dpkg", "-i", "/tmp/"+filepath.Base(oldDeb))
	t.Logf("kernel %s installed in %s:\n%s", oldVer, time.Since(start).Round(time.Second), grepLines(out, "unlockrd"))
	r.checkImage(e.Bins.Mkunlockrd, oldVer)
	if _, err := os.Stat(filepath.Join(root, "usr/sbin/update-initramfs")); err == nil {
		t.Errorf("initramfs-tools got installed next to unlockrd")
	}

	port := freePort(t)
	boot := func(ver string) {
		t.Helper()
		disk := r.buildDisk(e.Key, filepath.Join(work, "disk.img"))
		vm := harness.StartVM(t, harness.VMOptions{
			Name:      "realos-" + name + "-" + ver,
			Kernel:    filepath.Join(root, "boot", "vmlinuz-"+ver),
			Initramfs: filepath.Join(root, "boot", "initrd.img-"+ver),
			Disks:     []harness.Drive{{Path: disk}},
			Network:   harness.NIC{Netdev: fmt.Sprintf("user,hostfwd=tcp:127.0.0.1:%d-:8443", port)},
			UUID:      uuid,
			SMBIOS:    []string{harness.TokenCredential(e.Token)},
			MemoryMB:  1536,
			Timeout:   20 * time.Minute,
		})
		vm.ExpectLine(`^unlockrd: switch root: `, stageTimeout)
		vm.ExpectLine(`^`+realOSPrefix+`keyserver active`, 12*time.Minute)
		fetchKey(t, ctx, port, ksPin, ksToken)
		vm.ExpectLine(`^`+realOSPrefix+`done`, 5*time.Minute)
		vm.Wait(5 * time.Minute)
		var lines []string
		for _, l := range vm.Lines() {
			// Another writer on the console (a kernel message) may have
			// put text before the check's line.
			if i := strings.Index(l.Text, realOSPrefix); i >= 0 {
				lines = append(lines, l.Text[i:])
			} else if strings.HasPrefix(l.Text, "REALOS-journal: ") {
				lines = append(lines, l.Text)
			}
		}
		checkReport(t, ver, lines)
		t.Logf("real-OS boot of %s %s:\n%s", name, ver, strings.Join(lines, "\n"))
	}
	boot(oldVer)

	// Upgrade. First with a configuration that cannot build: dpkg must
	// fail, the old image stay byte for byte, nothing half-written remain.
	oldImg := filepath.Join(root, "boot", "initrd.img-"+oldVer)
	before := fileSHA(t, oldImg)
	r.write("/etc/unlockrd/unlockrd.yaml", strings.Replace(cfg.YAML(), srv.Pin, "sha256//broken", 1), 0o644)
	// The hook rebuilding the installed kernel's image fails the same way
	// and leaves that image as it was.
	if out, err := r.try("/etc/kernel/postinst.d/unlockrd", oldVer, "/boot/vmlinuz-"+oldVer); err == nil {
		t.Fatalf("postinst.d/unlockrd %s with a broken configuration succeeded:\n%s", oldVer, out)
	} else if !strings.Contains(out, "the previous /boot/initrd.img-"+oldVer+" is unchanged") {
		t.Errorf("postinst.d/unlockrd %s failed without saying the image is unchanged:\n%s", oldVer, out)
	}
	if out, err := r.try("dpkg", "-i", "/tmp/"+filepath.Base(newDeb)); err == nil {
		t.Fatalf("kernel install with a broken configuration succeeded:\n%s", out)
	} else {
		t.Logf("broken configuration, dpkg fails as it must (%v):\n%s", err, grepLines(out, "unlockrd"))
	}
	if got := fileSHA(t, oldImg); got != before {
		t.Errorf("%s changed by a failed build", oldImg)
	}
	if _, err := os.Stat(filepath.Join(root, "boot", "initrd.img-"+newVer)); err == nil {
		t.Errorf("a failed build left initrd.img-%s", newVer)
	}
	if left, _ := filepath.Glob(filepath.Join(root, "boot", ".*unlockrd*")); len(left) > 0 {
		t.Errorf("a failed build left %v", left)
	}
	// Fixed configuration: dpkg finishes the upgrade through the hook.
	r.write("/etc/unlockrd/unlockrd.yaml", cfg.YAML(), 0o644)
	out = r.run("dpkg", "--configure", "-a")
	t.Logf("fixed configuration, dpkg --configure -a:\n%s", grepLines(out, "unlockrd"))
	r.checkImage(e.Bins.Mkunlockrd, newVer)
	if got := fileSHA(t, oldImg); got != before {
		t.Errorf("%s changed by the upgrade", oldImg)
	}
	boot(newVer)

	// systemd's kernel-install runs the plugin (Debian's "other" layout:
	// /boot/initrd.img-VERSION, as the hooks).
	r.run("kernel-install", "remove", oldVer)
	if _, err := os.Stat(oldImg); err == nil {
		t.Errorf("kernel-install remove %s left %s", oldVer, oldImg)
	}
	out = r.run("kernel-install", "--verbose", "add", oldVer, "/boot/vmlinuz-"+oldVer)
	t.Logf("kernel-install add %s:\n%s", oldVer, grepLines(out, "unlockrd"))
	r.checkImage(e.Bins.Mkunlockrd, oldVer)
	r.checkLoaderEntry(e.Bins.Mkunlockrd, oldVer)

	// Removing the old kernel removes its image (postrm.d).
	r.run("dpkg", "--purge", pkgName(oldDeb))
	if _, err := os.Stat(oldImg); err == nil {
		t.Errorf("%s left after removing its kernel", oldImg)
	}
}

// checkReport checks the check unit's lines of one boot.
func checkReport(t *testing.T, ver string, lines []string) {
	t.Helper()
	want := map[string]*regexp.Regexp{
		"kernel":    regexp.MustCompile(`^kernel ` + regexp.QuoteMeta(ver) + `$`),
		"state":     regexp.MustCompile(`^state (running|degraded)$`),
		"target":    regexp.MustCompile(`^target \S+\.target active$`),
		"pid1":      regexp.MustCompile(`^pid1 systemd$`),
		"data":      regexp.MustCompile(`^data /dev/mapper/data ext4 on /var/lib/postgresql$`),
		"postgres":  regexp.MustCompile(`^postgres wrote and read row \S+ in /var/lib/postgresql/\S+ on /dev/mapper/data$`),
		"swap":      regexp.MustCompile(`^swap /dev/(mapper/swap|dm-\d+) partition$`),
		"keyserver": regexp.MustCompile(`^keyserver active$`),
		"failed":    regexp.MustCompile(`^failed none$`),
		"security":  regexp.MustCompile(`^security .*Overall exposure level for unlockrd-keyserver\.service: \d+\.\d+`),
		"fetched":   regexp.MustCompile(`^fetched ok`),
	}
	seen := map[string]bool{}
	for _, l := range lines {
		l = strings.TrimPrefix(l, realOSPrefix)
		k, _, _ := strings.Cut(l, " ")
		if re, ok := want[k]; ok {
			seen[k] = true
			if !re.MatchString(l) {
				t.Errorf("boot of %s: %q does not match %s", ver, l, re)
			}
		}
	}
	for k := range want {
		if !seen[k] {
			t.Errorf("boot of %s: no %q line from the check unit", ver, k)
		}
	}
}

// fetchKey asks the guest's key server for the enrolled client's key
// through QEMU's port forwarding, with curl (an outside client) trusting
// the server only through its pin.
func fetchKey(t *testing.T, ctx context.Context, port int, pin, token string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		cmd := exec.CommandContext(ctx, "curl", "-sS", "--max-time", "20", "-k", "--pinnedpubkey", pin,
			"-H", "Authorization: Bearer "+token,
			fmt.Sprintf("https://127.0.0.1:%d/v1/keys/realos-client", port))
		out, err := cmd.Output()
		if err == nil {
			var resp struct {
				Keys []struct{ ID, Key string }
			}
			if err := json.Unmarshal(out, &resp); err != nil || len(resp.Keys) == 0 {
				t.Fatalf("guest key server answered %d bytes that are not a key list: %v", len(out), err)
			}
			k, err := base64.StdEncoding.DecodeString(resp.Keys[0].Key)
			if err != nil || len(k) != 32 {
				t.Fatalf("guest key server's key: %d bytes, %v", len(k), err)
			}
			t.Logf("fetched key %s (%d bytes) from the guest's unlockrd-keyserver through hostfwd port %d", resp.Keys[0].ID, len(k), port)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no key from the guest's key server on 127.0.0.1:%d: %v", port, err)
		}
		time.Sleep(3 * time.Second)
	}
}

// chroot runs Debian's tools inside a root folder, with /proc mounted in a
// private mount namespace (gone with the command).
type chroot struct {
	t   *testing.T
	ctx context.Context
	dir string
}

func (r *chroot) try(args ...string) (string, error) {
	sh := `mount -t proc proc "$0/proc" && exec chroot "$0" "$@"`
	cmd := exec.CommandContext(r.ctx, "unshare", append([]string{"--mount", "--propagation", "private", "--fork", "sh", "-c", sh, r.dir}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C", "HOME=/root"}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (r *chroot) run(args ...string) string {
	r.t.Helper()
	out, err := r.try(args...)
	if err != nil {
		r.t.Fatalf("in the root: %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (r *chroot) path(p string) string { return filepath.Join(r.dir, filepath.Clean("/"+p)) }

func (r *chroot) write(p, data string, mode os.FileMode) {
	r.t.Helper()
	if err := os.MkdirAll(filepath.Dir(r.path(p)), 0o755); err != nil {
		r.t.Fatal(err)
	}
	if err := os.WriteFile(r.path(p), []byte(data), mode); err != nil {
		r.t.Fatal(err)
	}
	if err := os.Chmod(r.path(p), mode); err != nil {
		r.t.Fatal(err)
	}
}

func (r *chroot) copyIn(src, p string) {
	r.t.Helper()
	if out, err := exec.Command("cp", src, r.path(p)).CombinedOutput(); err != nil {
		r.t.Fatalf("copy %s into the root: %v\n%s", src, err, out)
	}
}

// checkImage checks that /boot/initrd.img-VER is unlockrd's image, built
// for that kernel's modules, as `mkunlockrd ls` reads it back.
func (r *chroot) checkImage(mkunlockrd, ver string) {
	r.t.Helper()
	img := r.path("/boot/initrd.img-" + ver)
	r.checkImageFile(mkunlockrd, img, ver)
	if st, err := os.Stat(img); err == nil && st.Mode().Perm() != 0o600 {
		r.t.Errorf("%s: mode %v, want 0600 (the image holds the key server's token source and pins)", img, st.Mode().Perm())
	}
}

// checkImageFile checks that img is unlockrd's image for kernel ver.
func (r *chroot) checkImageFile(mkunlockrd, img, ver string) {
	r.t.Helper()
	out, err := exec.Command(mkunlockrd, "ls", img).CombinedOutput()
	if err != nil {
		r.t.Fatalf("mkunlockrd ls %s: %v\n%s", img, err, out)
	}
	for _, want := range []string{" init\n", " etc/unlockrd/config.json\n", " lib/modules/" + ver + "/kernel\n"} {
		if !bytes.Contains(out, []byte(want)) {
			r.t.Errorf("%s: no %s in the image (mkunlockrd ls):\n%s", img, want, out)
		}
	}
}

// checkLoaderEntry runs kernel-install in the boot loader specification
// layout (systemd-boot's) into a scratch boot root, twice: with Debian's
// bridge plugin (55- or 85-initrd.install, which stages
// /boot/initrd.img-VER) and with it masked. Either way the entry must name
// exactly one initrd, unlockrd's: two would be unpacked one over the
// other, the second winning.
func (r *chroot) checkLoaderEntry(mkunlockrd, ver string) {
	r.t.Helper()
	const boot, token = "/tmp/bls-boot", "unlockrdtest"
	r.write("/tmp/bls-conf/install.conf", "layout=bls\nBOOT_ROOT="+boot+"\n", 0o644)
	r.write("/tmp/bls-conf/entry-token", token+"\n", 0o644)
	masks := []string{r.path("/etc/kernel/install.d/55-initrd.install"), r.path("/etc/kernel/install.d/85-initrd.install")}
	defer func() {
		for _, m := range masks {
			os.Remove(m)
		}
	}()
	for _, c := range []struct {
		bridge bool
		staged string // the initrd the entry must name
	}{{true, "initrd.img-" + ver}, {false, "initrd"}} {
		if err := os.RemoveAll(r.path(boot)); err != nil {
			r.t.Fatal(err)
		}
		if err := os.MkdirAll(r.path(boot), 0o755); err != nil {
			r.t.Fatal(err)
		}
		for _, m := range masks {
			os.Remove(m)
			if !c.bridge {
				if err := os.MkdirAll(filepath.Dir(m), 0o755); err != nil {
					r.t.Fatal(err)
				}
				if err := os.Symlink("/dev/null", m); err != nil {
					r.t.Fatal(err)
				}
			}
		}
		out := r.run("env", "KERNEL_INSTALL_CONF_ROOT=/tmp/bls-conf", "MACHINE_ID=0123456789abcdef0123456789abcdef",
			"kernel-install", "--verbose", "add", ver, "/boot/vmlinuz-"+ver)
		entry, err := os.ReadFile(r.path(boot + "/loader/entries/" + token + "-" + ver + ".conf"))
		if err != nil {
			r.t.Fatalf("kernel-install (bls layout, Debian's bridge plugin %v) wrote no loader entry: %v\n%s", c.bridge, err, out)
		}
		var initrds []string
		for _, l := range strings.Split(string(entry), "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[0] == "initrd" {
				initrds = append(initrds, f[1])
			}
		}
		want := path.Join(boot, token, ver, c.staged)
		if len(initrds) != 1 || initrds[0] != want {
			r.t.Errorf("bls layout, Debian's bridge plugin %v: entry's initrds %q, want only %s\n%s\nkernel-install:\n%s",
				c.bridge, initrds, want, entry, out)
			continue
		}
		r.checkImageFile(mkunlockrd, r.path(want), ver)
		r.t.Logf("bls layout, Debian's bridge plugin %v: entry's initrd %s", c.bridge, want)
	}
	if err := os.RemoveAll(r.path(boot)); err != nil {
		r.t.Fatal(err)
	}
}

// stageOS configures the root for booting from unlockrd's initramfs:
// root remounted read-write by fstab; data and swap left alone (the
// initramfs opened and mounted them: no crypttab, no fstab entries, so
// systemd takes them over from /proc as they are); networkd for the key
// server; the check unit.
func (r *chroot) stageOS(uuid string) {
	r.t.Helper()
	r.write("/etc/fstab", "# / is mounted read-only by unlockrd's initramfs; this remounts it read-write.\n"+
		"# /var/lib/postgresql (/dev/mapper/data) and swap are opened and mounted by the initramfs.\n"+
		"PARTLABEL=root / ext4 defaults 0 0\n", 0o644)
	// systemd's GPT auto-discovery (systemd >= 254 without EFI too, so
	// Debian 13) sees the LUKS2 swap partition on the root's disk and
	// would open it a second time (systemd-cryptsetup@swap.service, which
	// fails): the initramfs has opened it. Masked, as an image pipeline
	// does (README, Installing on Debian).
	if err := os.MkdirAll(r.path("/etc/systemd/system-generators"), 0o755); err != nil {
		r.t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", r.path("/etc/systemd/system-generators/systemd-gpt-auto-generator")); err != nil {
		r.t.Fatal(err)
	}
	r.write("/etc/hostname", "realos\n", 0o644)
	r.write("/etc/machine-id", strings.ReplaceAll(uuid, "-", "")+"\n", 0o444)
	r.write("/etc/systemd/network/50-dhcp.network", "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n", 0o644)
	r.run("systemctl", "enable", "systemd-networkd")
	r.write("/usr/local/sbin/realos-check", realOSCheck, 0o755)
	r.write("/etc/systemd/system/realos-check.service", `[Unit]
Description=unlockrd real-OS test report
After=multi-user.target

[Service]
Type=exec
ExecStart=/usr/local/sbin/realos-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
`, 0o644)
	r.run("systemctl", "enable", "realos-check.service")
	// The check owns the serial console: no login prompt in its lines.
	r.run("systemctl", "mask", "serial-getty@ttyS0.service")
}

// stageKeyServer prepares the packaged key server's data folder the way an
// admin would (as its user), enrolls a client and returns its token and
// the server's pin.
func (r *chroot) stageKeyServer(bin string) (token, pin string) {
	r.t.Helper()
	data := r.path("/var/lib/unlockrd-keyserver")
	var err error
	if pin, err = harness.NewKeyServerData(r.ctx, bin, data); err != nil {
		r.t.Fatal(err)
	}
	if token, err = harness.AddHost(r.ctx, bin, data, "realos-client", nil); err != nil {
		r.t.Fatal(err)
	}
	r.run("chown", "-R", "unlockrd-keyserver:unlockrd-keyserver", "/var/lib/unlockrd-keyserver")
	r.run("chmod", "0700", "/var/lib/unlockrd-keyserver")
	return token, pin
}

// buildDisk writes the root as a GPT disk: the root file system, the
// PostgreSQL folder moved into a LUKS2 data volume (its mount point left
// empty) and LUKS2 swap, both opened by key.
func (r *chroot) buildDisk(key []byte, path string) string {
	r.t.Helper()
	pg := r.path("/var/lib/postgresql")
	data := filepath.Join(filepath.Dir(r.dir), "data")
	os.RemoveAll(data)
	if out, err := exec.Command("cp", "-a", pg, data).CombinedOutput(); err != nil {
		r.t.Fatalf("%v\n%s", err, out)
	}
	// The root's own folder stays as the empty mount point.
	ents, _ := os.ReadDir(pg)
	for _, e := range ents {
		os.RemoveAll(filepath.Join(pg, e.Name()))
	}
	defer func() {
		// Back into the root for the next disk.
		ents, _ := os.ReadDir(data)
		for _, e := range ents {
			os.Rename(filepath.Join(data, e.Name()), filepath.Join(pg, e.Name()))
		}
	}()
	rootSize := dirSize(r.t, r.dir)*5/4 + 256<<20
	d := harness.Disk{Partitions: []harness.Partition{
		{Name: "root", Size: rootSize, FS: &harness.Ext4{Label: "root", Tree: r.dir}},
		{Name: "data", Size: 256 << 20, LUKS: &harness.LUKS{Keys: [][]byte{key}}, FS: &harness.Ext4{Label: "data", Tree: data}},
		{Name: "swap", Size: 64 << 20, Swap: true, LUKS: &harness.LUKS{Keys: [][]byte{key}}},
	}}
	start := time.Now()
	if _, err := d.BuildFile(r.ctx, path); err != nil {
		r.t.Fatal(err)
	}
	r.t.Logf("disk %s (root %d MiB) built in %s", path, rootSize>>20, time.Since(start).Round(time.Second))
	return path
}

// realOSCheck runs in the booted OS once the default target is reached,
// prints one line per check on the serial console, waits until the host
// fetched a key from the key server, and powers off.
const realOSCheck = `#!/bin/sh
p() { echo "REALOS: $*"; }
state=$(systemctl is-system-running --wait)
target=$(systemctl get-default)
p "kernel $(uname -r)"
p "state $state"
p "target $target $(systemctl is-active "$target")"
p "pid1 $(cat /proc/1/comm)"
p "data $(findmnt -no SOURCE,FSTYPE,TARGET /var/lib/postgresql | tr -s ' ')" | sed 's/ext4 /ext4 on /'
# PostgreSQL, started by systemd after switch root, writes a row and reads it back.
row=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
pg() { runuser -u postgres -- psql -qtAX -c "$1" 2>&1; }
pg "CREATE TABLE IF NOT EXISTS realos (row text PRIMARY KEY, kernel text)" >/dev/null
w=$(pg "INSERT INTO realos VALUES ('$row', '$(uname -r)') RETURNING row")
pg "CHECKPOINT" >/dev/null
rd=$(pg "SELECT row FROM realos WHERE row = '$row'")
dir=$(pg "SHOW data_directory")
if [ "$w" = "$row" ] && [ "$rd" = "$row" ]; then
	p "postgres wrote and read row $row in $dir on $(findmnt -no SOURCE -T "$dir")"
else
	p "postgres FAILED: insert [$w] select [$rd] dir [$dir]"
fi
p "swap $(awk 'NR > 1 { print $1, $2 }' /proc/swaps)"
p "keyserver $(systemctl is-active unlockrd-keyserver.service)"
p "security $(systemd-analyze security unlockrd-keyserver.service --no-pager 2>&1 | tail -n 1)"
failed=$(systemctl --failed --plain --no-legend | awk '{ print $1 }' | tr '\n' ' ')
p "failed ${failed:-none}"
# The host fetches a key through port forwarding; the server's audit log says so.
i=0
while [ $i -lt 200 ]; do
	line=$(journalctl -u unlockrd-keyserver.service -o cat --no-pager | grep '"outcome":"ok"' | head -n 1)
	[ -n "$line" ] && break
	sleep 1; i=$((i + 1))
done
if [ -n "$line" ]; then p "fetched ok: $line"; else p "fetched NOTHING"; fi
journalctl -b -p warning -o short-monotonic --no-pager | tail -n 20 | sed 's/^/REALOS-journal: /'
sync
p "done"
systemctl poweroff
`

// kernelRelease is the kernel release a linux-image package installs.
func kernelRelease(t *testing.T, deb string) string {
	t.Helper()
	name := pkgName(deb)
	return strings.TrimPrefix(name, "linux-image-")
}

func pkgName(deb string) string {
	n, _, _ := strings.Cut(filepath.Base(deb), "_")
	return n
}

// sortVersions orders kernel package files oldest first, by dpkg's rules.
func sortVersions(debs []string) {
	ver := func(d string) string { v := strings.Split(filepath.Base(d), "_"); return v[1] }
	if exec.Command("dpkg", "--compare-versions", ver(debs[0]), "gt", ver(debs[1])).Run() == nil {
		debs[0], debs[1] = debs[1], debs[0]
	}
}

func fileSHA(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func dirSize(t *testing.T, dir string) int64 {
	t.Helper()
	out, err := exec.Command("du", "-sb", dir).Output()
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(out))
	n, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func grepLines(out, word string) string {
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, word) {
			keep = append(keep, "    "+l)
		}
	}
	return strings.Join(keep, "\n")
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// cacheBase is the machine-wide cache, as the setup scripts name it.
func cacheBase() string {
	if d := os.Getenv("UNLOCKRD_CACHE"); d != "" {
		return d
	}
	return "/var/cache/unlockrd"
}
