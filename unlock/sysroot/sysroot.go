// Package sysroot is boot stages 7 and 9: it mounts the real root and the
// data volumes inside it, and switches root into the real OS.
package sysroot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one file system to mount.
type Mount struct {
	Source  string // block device path
	Target  string // absolute path inside the new root ("/" for root)
	FSType  string
	Options []string
}

// Flags splits mount options into MS_* flags and the data string the file
// system parses, the way mount(8) does.
func Flags(opts []string) (uintptr, string) {
	var flags uintptr
	var data []string
	for _, o := range opts {
		if f, ok := flagOpts[o]; ok {
			if f.clear {
				flags &^= f.flag
			} else {
				flags |= f.flag
			}
			continue
		}
		if o == "defaults" || o == "" {
			continue
		}
		data = append(data, o)
	}
	return flags, strings.Join(data, ",")
}

type flagOpt struct {
	flag  uintptr
	clear bool
}

var flagOpts = map[string]flagOpt{
	"ro": {unix.MS_RDONLY, false}, "rw": {unix.MS_RDONLY, true},
	"nosuid": {unix.MS_NOSUID, false}, "suid": {unix.MS_NOSUID, true},
	"nodev": {unix.MS_NODEV, false}, "dev": {unix.MS_NODEV, true},
	"noexec": {unix.MS_NOEXEC, false}, "exec": {unix.MS_NOEXEC, true},
	"noatime": {unix.MS_NOATIME, false}, "atime": {unix.MS_NOATIME, true},
	"nodiratime": {unix.MS_NODIRATIME, false}, "relatime": {unix.MS_RELATIME, false},
	"strictatime": {unix.MS_STRICTATIME, false}, "sync": {unix.MS_SYNCHRONOUS, false},
	"dirsync": {unix.MS_DIRSYNC, false}, "lazytime": {unix.MS_LAZYTIME, false},
}

// MountAll mounts root at newRoot and every data mount inside it. A data
// mount point must already exist in the new root: creating it would hide a
// misconfiguration behind an empty directory the database then fills.
func MountAll(ctx context.Context, newRoot string, root Mount, data []Mount) error {
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return err
	}
	if err := mount(root.Source, newRoot, root.FSType, root.Options); err != nil {
		return fmt.Errorf("root %s on %s: %w", root.Source, newRoot, err)
	}
	for _, m := range data {
		if err := ctx.Err(); err != nil {
			return err
		}
		target := filepath.Join(newRoot, m.Target)
		st, err := os.Stat(target)
		if err != nil || !st.IsDir() {
			return fmt.Errorf("data %s: mount point %s does not exist in the new root", m.Source, m.Target)
		}
		if err := mount(m.Source, target, m.FSType, m.Options); err != nil {
			return fmt.Errorf("data %s on %s: %w", m.Source, m.Target, err)
		}
	}
	return nil
}

func mount(src, target, fstype string, opts []string) error {
	if fstype == "" {
		fstype = "ext4"
	}
	flags, data := Flags(opts)
	if err := unix.Mount(src, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount -t %s -o %s: %w", fstype, strings.Join(opts, ","), err)
	}
	return nil
}

// SwitchRoot moves /dev, /proc, /sys and /run into newRoot, deletes the
// initramfs contents, makes newRoot the root and executes init as PID 1.
// It returns only on failure.
//
// It refuses to start unless it is PID 1, / is the initramfs (ramfs or
// tmpfs), newRoot is a different file system and init exists there:
// deleting files on the wrong file system is not recoverable.
func SwitchRoot(newRoot, init string, env []string) error {
	if os.Getpid() != 1 {
		return fmt.Errorf("switch root: not PID 1 (pid %d)", os.Getpid())
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs("/", &sfs); err != nil {
		return fmt.Errorf("switch root: statfs /: %w", err)
	}
	if sfs.Type != unix.RAMFS_MAGIC && sfs.Type != unix.TMPFS_MAGIC {
		return fmt.Errorf("switch root: / is not an initramfs (fs type %#x)", sfs.Type)
	}
	rootDev, err := devOf("/")
	if err != nil {
		return err
	}
	newDev, err := devOf(newRoot)
	if err != nil {
		return err
	}
	if rootDev == newDev {
		return fmt.Errorf("switch root: %s is not a mounted file system", newRoot)
	}
	initPath := filepath.Join(newRoot, init)
	if st, err := os.Stat(initPath); err != nil || st.Mode()&0o111 == 0 {
		return fmt.Errorf("switch root: %s is not an executable in the new root", init)
	}
	for _, m := range []string{"/dev", "/proc", "/sys", "/run"} {
		if d, err := devOf(m); err != nil || d == rootDev {
			continue // not a mount
		}
		target := filepath.Join(newRoot, m)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("switch root: %w", err)
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("switch root: move %s: %w", m, err)
		}
	}
	// Free the initramfs memory; the running binary stays mapped.
	if err := deleteTree("/", rootDev); err != nil {
		return fmt.Errorf("switch root: delete initramfs: %w", err)
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("switch root: chdir: %w", err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("switch root: move %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("switch root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("switch root: chdir /: %w", err)
	}
	if err := unix.Exec(init, []string{init}, env); err != nil {
		return fmt.Errorf("switch root: exec %s: %w", init, err)
	}
	return nil
}

func devOf(p string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", p, err)
	}
	return st.Dev, nil
}

// deleteTree removes everything below dir that lives on device dev,
// without crossing into other file systems (the new root, moved mounts).
func deleteTree(dir string, dev uint64) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		d, err := devOf(p)
		if err != nil || d != dev {
			continue
		}
		if e.IsDir() {
			if err := deleteTree(p, dev); err != nil {
				errs = append(errs, err)
				continue
			}
			if err := unix.Rmdir(p); err != nil && !errors.Is(err, unix.EBUSY) {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", p, err))
			}
			continue
		}
		if err := unix.Unlink(p); err != nil {
			errs = append(errs, fmt.Errorf("unlink %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
