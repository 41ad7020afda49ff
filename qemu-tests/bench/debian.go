package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
)

// The Debian side of the bench: Debian's own initramfs-tools images for
// each kernel the suite boots, built in a debootstrap chroot of that
// kernel's release, and a disk whose LUKS2 volumes clevis binds to a Tang
// server. Everything is cached machine-wide (debianDir) and rebuilt when
// missing: only the first run pays for debootstrap, apt and mkinitramfs.

// debianFormat is bumped when the cache's content changes meaning, so
// that an older cache is rebuilt rather than misread.
const debianFormat = 2

// tangPorts are where the bench's Tang server for each kernel's race
// listens on the host's loopback (the guest dials 10.0.2.2:port). A port
// is part of the cached disk: clevis writes the URL into each volume's
// token. One per kernel, so that races on both can run side by side.
var tangPorts = map[string]int{
	kernelcache.Debian12: 17391,
	kernelcache.Debian13: 17392,
}

// debianSuites maps the suite's kernels to the Debian release they ship
// in: the chroot that builds a kernel's image is of that release.
var debianSuites = map[string]string{
	kernelcache.Debian12: "bookworm",
	kernelcache.Debian13: "trixie",
}

// debianImage is one cached Debian image and how it was made.
type debianImage struct {
	File    string  `json:"file"`
	Size    int64   `json:"size"`
	Modules int     `json:"modules"`
	Seconds float64 `json:"mkinitramfs_seconds"`
}

// debianCache is debianDir(kernel)/images.json.
type debianCache struct {
	Format   int    `json:"format"`
	Release  string `json:"release"`
	Suite    string `json:"suite"`
	Versions string `json:"versions"`
	// Cryptsetup is initramfs-tools + cryptsetup-initramfs (CRYPTSETUP=y,
	// no crypttab): the size reference.
	Cryptsetup debianImage `json:"cryptsetup"`
	// Clevis adds clevis-initramfs and the crypttab of Disk's volumes:
	// the image the race boots.
	Clevis debianImage `json:"clevis"`
	// Disk is the walking-skeleton layout whose volumes clevis bound to
	// the Tang server in Tang, at TangPort.
	Disk     string `json:"disk"`
	Hello    string `json:"hello"`
	Tang     string `json:"tang_db"`
	TangPort int    `json:"tang_port"`
	dir      string
}

func (c *debianCache) path(name string) string { return filepath.Join(c.dir, name) }

// debianDir is where a kernel's Debian images are cached:
// ${UNLOCKRD_CACHE:-/var/cache/unlockrd}/bench-debian/<kernel release>.
func debianDir(k harness.KernelFiles) string {
	return filepath.Join(kernelcache.CacheBase(), "bench-debian", k.Release)
}

// chrootScript runs one step in the reference chroot, inside a private
// mount namespace (unshare -m): /proc, /sys and /dev are mounted for the
// step only and vanish with it, whatever happens. The bind step also runs
// in a network namespace of its own, where 10.0.2.2 (the host as a QEMU
// guest sees it) is a loopback address served by Tang: clevis writes the
// URL the guest will dial, and checks it works, without any real network.
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
	: >"$root/etc/crypttab"
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
bind)
	db=$1 port=$2 key=$3
	shift 3
	ip link set lo up
	ip addr add 10.0.2.2/32 dev lo
	socat "TCP-LISTEN:$port,bind=10.0.2.2,reuseaddr,fork" "EXEC:/usr/libexec/tangd $db" 2>/dev/null &
	tang=$!
	trap 'kill $tang' EXIT
	for i in $(seq 100); do (exec 3<>"/dev/tcp/10.0.2.2/$port") 2>/dev/null && break; sleep 0.1; done
	for vol; do
		ch clevis luks bind -y -k "$key" -d "$vol" tang "{\"url\":\"http://10.0.2.2:$port\"}"
		slot=$(ch clevis luks list -d "$vol" | sed -n 's/^\([0-9]*\): tang .*/\1/p')
		test -n "$slot"
		# Oracle: cryptsetup itself opens the slot with what Tang gives back.
		ch sh -c 'clevis luks pass -d "$1" -s "$2" | cryptsetup open --test-passphrase --key-slot "$2" --key-file - "$1"' sh "$vol" "$slot"
		echo "bound $vol slot $slot" >&2
	done ;;
esac
`

// debianImages returns the cached Debian images and race disk for the
// kernel, building them first when the cache lacks them.
func debianImages(ctx context.Context, k harness.KernelFiles, r *report) (*debianCache, error) {
	suite, ok := debianSuites[k.Name]
	if !ok {
		return nil, fmt.Errorf("no Debian release known for kernel %s", k.Name)
	}
	dir := debianDir(k)
	meta := filepath.Join(dir, "images.json")
	if b, err := os.ReadFile(meta); err == nil {
		c := &debianCache{dir: dir}
		if err := json.Unmarshal(b, c); err == nil && c.Format == debianFormat && c.Release == k.Release && c.complete() {
			return c, nil
		}
	}
	root, err := harness.ModuleRoot()
	if err != nil {
		return nil, err
	}
	r.printf("building Debian %s's images for %s in a chroot under %s (once; cached) ...", suite, k.Release, dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "build.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	r.printf("  (log: %s)", logf.Name())
	if err := runLogged(ctx, logf, filepath.Join(root, "qemu-tests", "setup", "install-deps.sh"), "debootstrap", "tang", "socat"); err != nil {
		return nil, err
	}
	chroot := filepath.Join(dir, "chroot")
	done := filepath.Join(chroot, ".unlockrd-bench-complete")
	if _, err := os.Stat(done); err != nil {
		os.RemoveAll(chroot)
		mirror, err := archiveMirror()
		if err != nil {
			return nil, err
		}
		start := time.Now()
		if err := runLogged(ctx, logf, "debootstrap", "--variant=minbase",
			"--include=initramfs-tools,cryptsetup-initramfs,zstd", suite, chroot, mirror); err != nil {
			return nil, err
		}
		if err := os.WriteFile(done, nil, 0o644); err != nil {
			return nil, err
		}
		r.printf("  debootstrap %s from %s took %s", suite, mirror, time.Since(start).Round(time.Second))
	}
	// The kernel's modules and config, as its package would install them
	// (Debian 13's usrmerge'd /lib is /usr/lib: the same folder).
	mods := filepath.Join(chroot, "lib", "modules", k.Release)
	os.RemoveAll(mods)
	if err := os.MkdirAll(filepath.Dir(mods), 0o755); err != nil {
		return nil, err
	}
	if err := runLogged(ctx, logf, "cp", "-a", k.Modules, mods); err != nil {
		return nil, err
	}
	if err := runLogged(ctx, logf, "cp", filepath.Join(k.Dir, "config"), filepath.Join(chroot, "boot", "config-"+k.Release)); err != nil {
		return nil, err
	}
	// The size reference has no crypttab: without CRYPTSETUP=y
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
		unshare := []string{"-m", "--propagation", "private"}
		if args[0] == "bind" {
			unshare = append(unshare, "-n")
		}
		cmd := exec.CommandContext(ctx, "unshare", append(append(unshare, "bash", "-c", chrootScript, "chroot-step", chroot, k.Release), args...)...)
		cmd.Stderr = logf
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("chroot step %s: %w (see %s)", args[0], err, logf.Name())
		}
		return out, nil
	}
	build := func(name string, checks ...string) (debianImage, error) {
		// An image built by an interrupted run is reused (mkinitramfs
		// takes minutes on a loaded machine).
		side := filepath.Join(dir, name+".json")
		if b, err := os.ReadFile(side); err == nil {
			var img debianImage
			if json.Unmarshal(b, &img) == nil && img.File == name {
				if st, err := os.Stat(filepath.Join(dir, name)); err == nil && st.Size() == img.Size {
					return img, nil
				}
			}
		}
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
		for _, check := range checks {
			if !strings.Contains(string(list), check) {
				return debianImage{}, fmt.Errorf("%s lacks %s: not the image to compare with", name, strings.TrimSpace(check))
			}
		}
		img := debianImage{File: name, Seconds: secs, Modules: strings.Count(string(list), ".ko\n") + strings.Count(string(list), ".ko.xz\n")}
		if err := os.Rename(filepath.Join(chroot, inChroot), filepath.Join(dir, name)); err != nil {
			return debianImage{}, err
		}
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return debianImage{}, err
		}
		img.Size = st.Size()
		b, err := json.Marshal(img)
		if err != nil {
			return debianImage{}, err
		}
		return img, os.WriteFile(side, b, 0o644)
	}
	c := &debianCache{Format: debianFormat, Release: k.Release, Suite: suite, dir: dir}
	if _, err := step("prepare"); err != nil {
		return nil, err
	}
	if c.Cryptsetup, err = build("initramfs-tools-cryptsetup.img", "sbin/cryptsetup\n"); err != nil {
		return nil, err
	}
	if _, err := step("install", "clevis-initramfs", "clevis-luks"); err != nil {
		return nil, err
	}
	crypttab, err := c.buildDisk(ctx, k.Name, chroot, step)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(chroot, "etc", "crypttab"), []byte(crypttab), 0o644); err != nil {
		return nil, err
	}
	if c.Clevis, err = build("initramfs-tools-clevis.img", "bin/clevis\n", "cryptroot/crypttab\n"); err != nil {
		return nil, err
	}
	v, err := step("versions", "initramfs-tools", "cryptsetup-initramfs", "clevis-initramfs")
	if err != nil {
		return nil, err
	}
	c.Versions = strings.TrimSuffix(strings.Join(strings.Fields(strings.ReplaceAll(string(v), "\n", ", ")), " "), ",")
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(meta, b, 0o644); err != nil {
		return nil, err
	}
	return c, nil
}

// complete says whether every file the cache names exists.
func (c *debianCache) complete() bool {
	for _, f := range []string{c.Cryptsetup.File, c.Clevis.File, c.Disk, c.Tang} {
		if f == "" {
			return false
		}
		if _, err := os.Stat(c.path(f)); err != nil {
			return false
		}
	}
	return true
}

// raceRoot is the test init's configuration on the race disk's root for
// Debian's image: initramfs-tools only unlocks, so the test init mounts
// the unlocked data volume itself (after it took the time) to prove the
// unlock gave the right key.
func raceRoot() harness.TestInitConfig {
	return harness.TestInitConfig{
		Files:  []string{harness.HelloPath},
		Mounts: []initcfg.Mount{{Source: "/dev/mapper/data", Target: harness.DataMountPoint, FSType: "ext4", ReadOnly: true}},
	}
}

// buildDisk makes the race disk: the walking-skeleton layout (fixed LUKS
// UUIDs, so the image's crypttab stays valid), its data and swap volumes
// bound by clevis to a fresh Tang database. It returns the crypttab that
// names them with the initramfs option.
func (c *debianCache) buildDisk(ctx context.Context, kernel, chroot string, step func(...string) ([]byte, error)) (string, error) {
	port, ok := tangPorts[kernel]
	if !ok {
		return "", fmt.Errorf("no Tang port for kernel %s", kernel)
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return "", err
	}
	d := harness.DefaultDisk(key)
	d.Partitions[0].FS = harness.TestRoot("root", raceRoot(), harness.DataMountPoint)
	c.Hello = string(d.Hello())
	c.Disk, c.Tang, c.TangPort = "race-disk.img", "tang", port
	work, err := os.MkdirTemp(c.dir, "disk-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	bd, err := d.BuildFile(ctx, filepath.Join(work, "disk.img"))
	if err != nil {
		return "", err
	}
	os.RemoveAll(c.path(c.Tang))
	if err := os.MkdirAll(c.path(c.Tang), 0o755); err != nil {
		return "", err
	}
	if out, err := exec.CommandContext(ctx, "/usr/libexec/tangd-keygen", c.path(c.Tang)).CombinedOutput(); err != nil {
		return "", fmt.Errorf("tangd-keygen: %w: %s", err, out)
	}
	// clevis binds the volumes as files inside the chroot; they go back
	// into the disk afterwards.
	bindDir := filepath.Join(chroot, "tmp", "bind")
	os.RemoveAll(bindDir)
	if err := os.MkdirAll(bindDir, 0o700); err != nil {
		return "", err
	}
	defer os.RemoveAll(bindDir)
	if err := os.WriteFile(filepath.Join(bindDir, "key"), key, 0o600); err != nil {
		return "", err
	}
	args := []string{"bind", c.path(c.Tang), strconv.Itoa(port), "/tmp/bind/key"}
	var crypttab strings.Builder
	var parts []*harness.BuiltPartition
	for _, name := range []string{"data", "swap"} {
		p, err := bd.Partition(name)
		if err != nil {
			return "", err
		}
		if err := copyRange(bd.Path, p.Offset, p.Size, filepath.Join(bindDir, name+".img"), 0); err != nil {
			return "", err
		}
		args = append(args, "/tmp/bind/"+name+".img")
		parts = append(parts, p)
		fmt.Fprintf(&crypttab, "%s UUID=%s none luks,initramfs\n", name, p.LUKS.UUID)
	}
	if _, err := step(args...); err != nil {
		return "", err
	}
	for _, p := range parts {
		if err := copyRange(filepath.Join(bindDir, p.Name+".img"), 0, p.Size, bd.Path, p.Offset); err != nil {
			return "", err
		}
	}
	if err := os.Rename(bd.Path, c.path(c.Disk)); err != nil {
		return "", err
	}
	return crypttab.String(), nil
}

// copyRange copies n bytes at srcOff of src to dstOff of dst (created if
// missing, never truncated).
func copyRange(src string, srcOff, n int64, dst string, dstOff int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(io.NewOffsetWriter(out, dstOff), io.NewSectionReader(in, srcOff, n)); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// archiveMirror is the Debian archive of the machine's own apt sources
// (the entry for bookworm, which serves trixie too, as fetch-kernel.sh
// derives its sources): no archive host is written into the repository.
// BENCH_DEBIAN_MIRROR overrides it.
func archiveMirror() (string, error) {
	if m := os.Getenv("BENCH_DEBIAN_MIRROR"); m != "" {
		return m, nil
	}
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*")
	for _, f := range append([]string{"/etc/apt/sources.list"}, files...) {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if uri := bookwormURI(string(b), strings.HasSuffix(f, ".sources")); uri != "" {
			return uri, nil
		}
	}
	return "", errors.New("no bookworm entry in the machine's apt sources to take the Debian archive from (set BENCH_DEBIAN_MIRROR)")
}

// bookwormURI finds the URI of a "bookworm" suite in a one-line sources
// list or, with deb822, a .sources file.
func bookwormURI(text string, deb822 bool) string {
	if deb822 {
		for _, stanza := range strings.Split(text, "\n\n") {
			fields := map[string][]string{}
			sc := bufio.NewScanner(strings.NewReader(stanza))
			for sc.Scan() {
				k, v, ok := strings.Cut(sc.Text(), ":")
				if ok && !strings.HasPrefix(k, "#") {
					fields[k] = strings.Fields(v)
				}
			}
			for _, s := range fields["Suites"] {
				if s == "bookworm" && len(fields["URIs"]) > 0 {
					return fields["URIs"][0]
				}
			}
		}
		return ""
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		i := 1
		if strings.HasPrefix(f[i], "[") {
			for i < len(f) && !strings.HasSuffix(f[i], "]") {
				i++
			}
			i++
		}
		if i+1 < len(f) && f[i+1] == "bookworm" {
			return f[i]
		}
	}
	return ""
}

// tangServer is Debian's tangd on the host's loopback, run per connection
// by socat (tangd is inetd-style; there is no systemd here to activate it).
type tangServer struct {
	cmd *exec.Cmd
}

// startTang serves the cache's Tang database on 127.0.0.1:TangPort, which
// the guest reaches as 10.0.2.2:TangPort.
func startTang(ctx context.Context, c *debianCache, log io.Writer) (*tangServer, error) {
	addr := fmt.Sprintf("127.0.0.1:%d", c.TangPort)
	if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		conn.Close()
		return nil, fmt.Errorf("tang: %s is already in use: the race disk's clevis tokens name port %d", addr, c.TangPort)
	}
	cmd := exec.CommandContext(ctx, "socat",
		fmt.Sprintf("TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork", c.TangPort),
		"EXEC:/usr/libexec/tangd "+c.path(c.Tang))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("tang: socat: %w (make deps)", err)
	}
	t := &tangServer{cmd: cmd}
	for i := 0; ; i++ {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return t, nil
		}
		if i == 100 {
			t.Stop()
			return nil, fmt.Errorf("tang: %s not listening after 10s: %w", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop ends socat (its per-connection tangd children end with their
// connections).
func (t *tangServer) Stop() {
	_ = t.cmd.Process.Kill()
	_ = t.cmd.Wait()
}
