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

	"github.com/unlockrd/unlockrd/unlock/blockdev"
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
// system parses, the way mount(8) does. Options only mount(8) or fstab
// readers understand (noauto, nofail, x-*, ...) are dropped; see
// ParseOptions for the ones that are refused.
func Flags(opts []string) (uintptr, string) {
	f, d, _ := ParseOptions(opts)
	return f, d
}

// ParseOptions is Flags with an error for options that would change what
// mount does rather than how (bind, move, remount, propagation): they have
// no place in a configured mount.
func ParseOptions(opts []string) (uintptr, string, error) {
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
		switch {
		case refusedOpts[o]:
			return 0, "", fmt.Errorf("mount option %q is not allowed here", o)
		case userspaceOpts[o], o == "", strings.HasPrefix(o, "x-"), strings.HasPrefix(o, "comment="):
			continue
		}
		data = append(data, o)
	}
	return flags, strings.Join(data, ","), nil
}

// userspaceOpts mean something to mount(8) or fstab readers only; the
// kernel would reject them as file-system data.
var userspaceOpts = map[string]bool{
	"defaults": true, "auto": true, "noauto": true, "nofail": true, "_netdev": true,
	"user": true, "nouser": true, "users": true, "owner": true, "group": true,
}

var refusedOpts = map[string]bool{
	"bind": true, "rbind": true, "move": true, "remount": true,
	"shared": true, "rshared": true, "slave": true, "rslave": true,
	"private": true, "rprivate": true, "unbindable": true, "runbindable": true,
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
	"nolazytime": {unix.MS_LAZYTIME, true}, "async": {unix.MS_SYNCHRONOUS, true},
	"norelatime": {unix.MS_RELATIME, true}, "nostrictatime": {unix.MS_STRICTATIME, true},
	"diratime": {unix.MS_NODIRATIME, true}, "silent": {unix.MS_SILENT, false}, "loud": {unix.MS_SILENT, true},
	"iversion": {unix.MS_I_VERSION, false}, "noiversion": {unix.MS_I_VERSION, true},
	"nosymfollow": {unix.MS_NOSYMFOLLOW, false}, "symfollow": {unix.MS_NOSYMFOLLOW, true},
}

// MountAll mounts root at newRoot and every data mount inside it. A
// mount without an fstype gets the one found on the device. A data mount
// point must already exist in the new root, as a real directory: creating
// it would hide a misconfiguration behind an empty directory the database
// then fills, and a symbolic link could point the mount anywhere, the
// initramfs included.
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
		if err := checkMountPoint(newRoot, m.Target); err != nil {
			return fmt.Errorf("data %s: %w", m.Source, err)
		}
		if err := mount(m.Source, filepath.Join(newRoot, m.Target), m.FSType, m.Options); err != nil {
			return fmt.Errorf("data %s on %s: %w", m.Source, m.Target, err)
		}
	}
	return nil
}

// ErrMountPoint is wrapped when a data mount point is missing or unsafe.
var ErrMountPoint = errors.New("bad mount point")

// checkMountPoint insists that target is a directory inside root reached
// without following any symbolic link.
func checkMountPoint(root, target string) error {
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open new root %s: %w", root, err)
	}
	defer unix.Close(rfd)
	rel := strings.TrimLeft(filepath.Clean("/"+target), "/")
	fd, err := unix.Openat2(rfd, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	switch {
	case err == nil:
		unix.Close(fd)
		return nil
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w: %s does not exist in the new root; create it there (mount points are never created)", ErrMountPoint, target)
	case errors.Is(err, unix.ELOOP):
		return fmt.Errorf("%w: %s goes through a symbolic link in the new root; mount points must be real directories", ErrMountPoint, target)
	case errors.Is(err, unix.ENOTDIR):
		return fmt.Errorf("%w: %s is not a directory in the new root", ErrMountPoint, target)
	}
	return fmt.Errorf("%w: %s: %v", ErrMountPoint, target, err)
}

func mount(src, target, fstype string, opts []string) error {
	if fstype == "" {
		c, _, _ := blockdev.Probe(src)
		if c.Kind != blockdev.FileSystem || !mountable[c.Format] {
			what := c.String()
			if c.Kind == blockdev.Blank {
				what = "nothing recognisable"
			}
			return fmt.Errorf("no fstype configured and %s holds %s", src, what)
		}
		fstype = c.Format
	}
	flags, data, err := ParseOptions(opts)
	if err != nil {
		return err
	}
	if err := unix.Mount(src, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount -t %s -o %s: %w", fstype, strings.Join(opts, ","), err)
	}
	return nil
}

// mountable are the detected contents that name a file system type.
var mountable = map[string]bool{
	"ext2": true, "ext3": true, "ext4": true, "xfs": true, "btrfs": true,
	"vfat": true, "f2fs": true, "squashfs": true, "iso9660": true,
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
		return fmt.Errorf("switch root: %s is on the initramfs, not a mounted file system", newRoot)
	}
	if err := checkInit(newRoot, init); err != nil {
		return err
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
	if env == nil {
		env = Env()
	}
	if err := unix.Exec(init, []string{init}, env); err != nil {
		return fmt.Errorf("switch root: exec %s: %w", init, err)
	}
	return nil
}

// checkInit insists that init, resolved inside newRoot the way it will be
// after the chroot (absolute symbolic links such as /sbin/init ->
// /lib/systemd/systemd included), is an executable regular file.
func checkInit(newRoot, init string) error {
	if !filepath.IsAbs(init) {
		return fmt.Errorf("switch root: init %q is not an absolute path", init)
	}
	rfd, err := unix.Open(newRoot, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("switch root: open %s: %w", newRoot, err)
	}
	defer unix.Close(rfd)
	fd, err := unix.Openat2(rfd, init, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return fmt.Errorf("switch root: %s does not exist in the new root: %w", init, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("switch root: stat %s: %w", init, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0 {
		return fmt.Errorf("switch root: %s is not an executable file in the new root (mode %#o)", init, st.Mode)
	}
	return nil
}

// Env is the environment the real init gets: nothing of the initramfs's
// own (which the kernel filled from unknown command-line words), just what
// an init expects.
func Env() []string {
	return []string{"HOME=/", "TERM=linux", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
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
