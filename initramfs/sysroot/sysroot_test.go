package sysroot

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		opts  []string
		flags uintptr
		data  string
	}{
		{[]string{"ro"}, unix.MS_RDONLY, ""},
		{[]string{"ro", "rw"}, 0, ""},
		{[]string{"noatime", "nodev", "data=ordered", "errors=remount-ro"}, unix.MS_NOATIME | unix.MS_NODEV, "data=ordered,errors=remount-ro"},
		{[]string{"defaults"}, 0, ""},
		// fstab-only options never reach the kernel.
		{[]string{"defaults", "nofail", "noauto", "x-systemd.device-timeout=5", "_netdev", "comment=foo", "nosuid"}, unix.MS_NOSUID, ""},
		{[]string{"sync", "async", "nosymfollow", "lazytime"}, unix.MS_NOSYMFOLLOW | unix.MS_LAZYTIME, ""},
		{[]string{"relatime", "norelatime", "strictatime"}, unix.MS_STRICTATIME, ""},
	} {
		f, d := Flags(tc.opts)
		if f != tc.flags || d != tc.data {
			t.Errorf("Flags(%v) = %#x %q, want %#x %q", tc.opts, f, d, tc.flags, tc.data)
		}
	}
	for _, o := range []string{"bind", "remount", "move", "rshared"} {
		if _, _, err := ParseOptions([]string{"ro", o}); err == nil || !strings.Contains(err.Error(), o) {
			t.Errorf("option %s: err = %v", o, err)
		}
	}
}

func TestMountPointMustBeARealDirectory(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"var/lib/postgresql", "elsewhere"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(root, "var/file"), nil, 0o644)
	os.Symlink("/etc", filepath.Join(root, "var/lib/escape"))
	os.Symlink("../../elsewhere", filepath.Join(root, "var/lib/relative"))
	for _, tc := range []struct{ target, want string }{
		{"/var/lib/postgresql", ""},
		{"/var/lib/mysql", "does not exist in the new root"},
		{"/var/lib/escape", "symbolic link"},
		{"/var/lib/relative", "symbolic link"},
		{"/var/file", "not a directory"},
		{"/../../etc", "does not exist"}, // cleaned to /etc, inside the root
	} {
		err := checkMountPoint(root, tc.target)
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.target, err)
			}
			continue
		}
		if !errors.Is(err, ErrMountPoint) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.target, err, tc.want)
		}
	}
}

func TestInitResolvedInsideTheNewRoot(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "sbin"), 0o755)
	os.MkdirAll(filepath.Join(root, "lib/systemd"), 0o755)
	os.WriteFile(filepath.Join(root, "lib/systemd/systemd"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(root, "sbin/plain"), []byte("x"), 0o644)
	// Debian's layout: an absolute link, valid only inside the new root.
	os.Symlink("/lib/systemd/systemd", filepath.Join(root, "sbin/init"))
	// A link to something only the initramfs (here: the host) has.
	os.Symlink("/bin/sh", filepath.Join(root, "sbin/hostonly"))
	for _, tc := range []struct{ init, want string }{
		{"/sbin/init", ""},
		{"/sbin/hostonly", "does not exist in the new root"},
		{"/sbin/plain", "not an executable"},
		{"/sbin", "not an executable"},
		{"sbin/init", "not an absolute path"},
	} {
		err := checkInit(root, tc.init)
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.init, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.init, err, tc.want)
		}
	}
}

func TestSwitchRootRefusesWhenNotPID1(t *testing.T) {
	if err := SwitchRoot(t.TempDir(), "/sbin/init", nil); err == nil || !strings.Contains(err.Error(), "not PID 1") {
		t.Fatalf("SwitchRoot outside PID 1: %v", err)
	}
}

// TestSwitchRootAsPID1 runs SwitchRoot for real: this test binary is
// started again as PID 1 of new PID and mount namespaces, moves itself
// into a tmpfs standing in for the initramfs (chroot), and there checks
// each refusal before switching into a second tmpfs, where the copy of
// itself it put at /sbin/init reports back. Everything happens inside
// tmpfs mounts of a private mount namespace: the host's files are out of
// reach before SwitchRoot is ever called.
func TestSwitchRootAsPID1(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (PID and mount namespaces)")
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	t.Logf("child output:\n%s", out.String())
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	o := out.String()
	for _, want := range []string{
		"refused not-initramfs: switch root: / is not an initramfs (fs type 0x9fa0)",
		"refused same-fs: switch root: /newroot is on the initramfs, not a mounted file system",
		"refused no-init: switch root: /sbin/init does not exist in the new root",
		"refused dangling: switch root: /sbin/init does not exist in the new root",
		"new init: pid=1 root=tmpfs marker=new-root run-moved=true old-gone=true env=HOME=/,TERM=linux,PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	} {
		if !strings.Contains(o, want) {
			t.Errorf("child output lacks %q", want)
		}
	}
}

const childEnv = "SYSROOT_TEST_CHILD"

func TestMain(m *testing.M) {
	switch {
	case os.Getpid() == 1 && os.Args[0] == "/sbin/init":
		newInit()
	case os.Getenv(childEnv) != "" && os.Getpid() == 1:
		if err := child(os.Getenv(childEnv)); err != nil {
			fmt.Println("child error:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// child is PID 1 of the new namespaces, still seeing the host's files.
func child(dir string) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	initrd := filepath.Join(dir, "initrd")
	os.MkdirAll(initrd, 0o755)
	if err := unix.Mount("initrd", initrd, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("tmpfs: %w", err)
	}
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		return err
	}
	for _, d := range []string{"newroot", "run", "etc/unlockrd"} {
		os.MkdirAll(filepath.Join(initrd, d), 0o755)
	}
	os.WriteFile(filepath.Join(initrd, "etc/unlockrd/config.json"), []byte("{}"), 0o644)
	if err := os.WriteFile(filepath.Join(initrd, "init"), self, 0o755); err != nil {
		return err
	}
	// From here on only the tmpfs is reachable; stop if it is not.
	if err := unix.Chroot(initrd); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs("/", &sfs); err != nil || sfs.Type != unix.TMPFS_MAGIC {
		return fmt.Errorf("not inside the tmpfs (%v): refusing to go on", err)
	}
	if err := unix.Mount("run", "/run", "tmpfs", 0, ""); err != nil {
		return err
	}
	os.WriteFile("/run/marker", []byte("run"), 0o644)

	// / not an initramfs: chroot into a fresh proc mount (nothing there
	// could be deleted even if the check failed), then come back.
	back, err := unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	os.MkdirAll("/procroot", 0o755)
	if err := unix.Mount("proc", "/procroot", "proc", 0, ""); err != nil {
		return err
	}
	if err := unix.Chroot("/procroot"); err != nil {
		return err
	}
	err = SwitchRoot("/self", "/sbin/init", nil)
	fmt.Printf("refused not-initramfs: %v\n", err)
	if err := unix.Fchdir(back); err != nil {
		return err
	}
	if err := unix.Chroot("."); err != nil {
		return err
	}
	unix.Close(back)
	if err := unix.Statfs("/", &sfs); err != nil || sfs.Type != unix.TMPFS_MAGIC {
		return fmt.Errorf("not back inside the tmpfs (%v): refusing to go on", err)
	}

	err = SwitchRoot("/newroot", "/sbin/init", nil)
	fmt.Printf("refused same-fs: %v\n", err)
	if err := unix.Mount("newroot", "/newroot", "tmpfs", 0, "mode=0755"); err != nil {
		return err
	}
	err = SwitchRoot("/newroot", "/sbin/init", nil)
	fmt.Printf("refused no-init: %v\n", err)
	os.MkdirAll("/newroot/sbin", 0o755)
	os.Symlink("/init", "/newroot/sbin/init") // exists only in the old root
	err = SwitchRoot("/newroot", "/sbin/init", nil)
	fmt.Printf("refused dangling: %v\n", err)
	if _, err := os.Stat("/etc/unlockrd/config.json"); err != nil {
		return fmt.Errorf("a refusal deleted the initramfs: %w", err)
	}
	os.Remove("/newroot/sbin/init")
	if err := os.WriteFile("/newroot/sbin/init", self, 0o755); err != nil {
		return err
	}
	os.WriteFile("/newroot/marker", []byte("new-root"), 0o644)
	os.Setenv("LEAK", "secret-looking")
	err = SwitchRoot("/newroot", "/sbin/init", nil)
	return fmt.Errorf("SwitchRoot returned: %w", err)
}

// newInit is the test binary exec'd by SwitchRoot as the real init.
func newInit() {
	var sfs unix.Statfs_t
	unix.Statfs("/", &sfs)
	fsName := fmt.Sprintf("%#x", sfs.Type)
	if sfs.Type == unix.TMPFS_MAGIC {
		fsName = "tmpfs"
	}
	marker, _ := os.ReadFile("/marker")
	run, _ := os.ReadFile("/run/marker")
	_, statErr := os.Stat("/etc/unlockrd")
	fmt.Printf("new init: pid=%d root=%s marker=%s run-moved=%t old-gone=%t env=%s\n",
		os.Getpid(), fsName, marker, string(run) == "run", errors.Is(statErr, os.ErrNotExist), strings.Join(os.Environ(), ","))
	io.WriteString(os.Stdout, "")
	os.Exit(0)
}

func TestNoFSTypeAndNothingOnTheDevice(t *testing.T) {
	p := filepath.Join(t.TempDir(), "blank")
	os.WriteFile(p, make([]byte, 1<<20), 0o600)
	err := mount(p, t.TempDir(), "", nil)
	if err == nil || !strings.Contains(err.Error(), "no fstype configured and "+p+" holds nothing recognisable") {
		t.Fatalf("err = %v", err)
	}
}
