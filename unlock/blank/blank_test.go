package blank

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const imgSize = 512 << 20

func newImage(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "dev.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, imgSize); err != nil {
		t.Fatal(err)
	}
	return p
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is needed (qemu-tests/setup/install-deps.sh): %v", name, err)
	}
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// blkid is the outside oracle: what it identifies in the file, if anything.
func blkid(t *testing.T, p string) string {
	t.Helper()
	out, err := exec.Command("blkid", "-p", "-o", "udev", p).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 2 {
			return "" // nothing found
		}
		t.Fatalf("blkid: %v", err)
	}
	var ids []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "ID_FS_TYPE=") || strings.HasPrefix(l, "ID_PART_TABLE_TYPE=") {
			ids = append(ids, l)
		}
	}
	return strings.Join(ids, " ")
}

func check(t *testing.T, p string) error {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return Check(f, fi.Size())
}

func writeAt(t *testing.T, p string, b []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestZeroIsBlank(t *testing.T) {
	p := newImage(t)
	if err := check(t, p); err != nil {
		t.Fatalf("all-zero image: %v", err)
	}
}

func TestRefusesInDoubt(t *testing.T) {
	if err := Check(bytes.NewReader(make([]byte, MinSize-1)), MinSize-1); !errors.Is(err, ErrNotBlank) {
		t.Fatalf("small device: %v", err)
	}
	// A reader shorter than the size it claims is a read error.
	if err := Check(bytes.NewReader(make([]byte, MinSize)), 2*MinSize); !errors.Is(err, ErrNotBlank) {
		t.Fatalf("short read: %v", err)
	}
}

// TestRealFormats makes each format with Debian's own tools and checks
// that wherever blkid sees something, Check says "not blank" too.
func TestRealFormats(t *testing.T) {
	if testing.Short() {
		t.Skip("runs mkfs tools")
	}
	type tc struct {
		name string
		make func(t *testing.T, p string)
	}
	simple := func(tool string, args ...string) func(t *testing.T, p string) {
		return func(t *testing.T, p string) { run(t, tool, append(args, p)...) }
	}
	fromDir := func(tool string, args ...string) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			src := t.TempDir()
			if err := os.WriteFile(filepath.Join(src, "f"), []byte("content"), 0o644); err != nil {
				t.Fatal(err)
			}
			out := p + ".fs"
			a := append([]string{}, args...)
			switch tool {
			case "mksquashfs":
				a = append([]string{src, out}, a...)
			case "mkfs.erofs":
				a = append(a, out, src)
			default:
				a = append(a, src, out)
			}
			run(t, tool, a...)
			b, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			writeAt(t, p, b, 0)
		}
	}
	cases := []tc{
		{"ext4", simple("mkfs.ext4", "-q", "-F")},
		{"ext2", simple("mkfs.ext2", "-q", "-F")},
		{"xfs", simple("mkfs.xfs", "-q", "-f")},
		{"btrfs", simple("mkfs.btrfs", "-q", "-f")},
		{"swap", simple("mkswap")},
		{"minix", simple("mkfs.minix")},
		{"minix3", simple("mkfs.minix", "-3")},
		{"cramfs", fromDir("mkfs.cramfs")},
		{"squashfs", fromDir("mksquashfs", "-quiet", "-noappend")},
		{"erofs", fromDir("mkfs.erofs", "--quiet")},
		{"vfat", simple("mkfs.vfat")},
		{"vfat32", simple("mkfs.vfat", "-F", "32")},
		{"exfat", simple("mkfs.exfat")},
		{"ntfs", simple("mkfs.ntfs", "-q", "-F", "-f")},
		{"f2fs", simple("mkfs.f2fs", "-q", "-f")},
		{"jfs", simple("mkfs.jfs", "-q")},
		{"reiserfs", simple("mkfs.reiserfs", "-q", "-f")},
		{"nilfs2", simple("mkfs.nilfs2", "-q", "-f")},
		{"gpt", func(t *testing.T, p string) {
			run(t, "sfdisk", "-q", p)
		}},
	}
	// sfdisk reads its script from stdin; done separately below.
	cases = cases[:len(cases)-1]
	for _, md := range []string{"16k", "32k", "64k", "128k", "256k", "512k", "1m", "2m", "4m"} {
		cases = append(cases, tc{"luks2-md" + md, luks(md, false)}, tc{"luks2-md" + md + "-primary-zeroed", luks(md, true)})
	}
	cases = append(cases,
		tc{"luks1", func(t *testing.T, p string) {
			kf := filepath.Join(t.TempDir(), "k")
			if err := os.WriteFile(kf, []byte("k"), 0o600); err != nil {
				t.Fatal(err)
			}
			run(t, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file", kf, p)
		}},
		tc{"ext4-first-MiB-wiped", func(t *testing.T, p string) {
			run(t, "mkfs.ext4", "-q", "-F", "-b", "1024", p)
			writeAt(t, p, make([]byte, Reserved), 0)
		}},
		tc{"btrfs-first-MiB-wiped", func(t *testing.T, p string) {
			run(t, "mkfs.btrfs", "-q", "-f", p)
			writeAt(t, p, make([]byte, Reserved), 0)
		}},
		tc{"mdraid-1.2-constructed", func(t *testing.T, p string) { writeAt(t, p, mdSuper(1), 4096) }},
		tc{"mdraid-0.90-constructed", func(t *testing.T, p string) {
			writeAt(t, p, md090(), imgSize&^(64<<10-1)-64<<10)
		}},
		tc{"lvm2-label-constructed", func(t *testing.T, p string) {
			l := make([]byte, 512)
			copy(l, "LABELONE")
			copy(l[0x18:], "LVM2 001")
			writeAt(t, p, l, 512)
		}},
		tc{"gpt", func(t *testing.T, p string) {
			cmd := exec.Command("sfdisk", "-q", p)
			cmd.Stdin = strings.NewReader("label: gpt\n,16M\n")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("sfdisk: %v\n%s", err, out)
			}
		}},
		tc{"mbr", func(t *testing.T, p string) {
			cmd := exec.Command("sfdisk", "-q", p)
			cmd.Stdin = strings.NewReader("label: dos\n,16M\n")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("sfdisk: %v\n%s", err, out)
			}
		}},
	)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := newImage(t)
			c.make(t, p)
			seen := blkid(t, p)
			err := check(t, p)
			t.Logf("blkid: %q; blank: %v", seen, err)
			if err == nil {
				t.Fatalf("blank says blank; blkid sees %q", seen)
			}
			if !errors.Is(err, ErrNotBlank) {
				t.Fatalf("error without ErrNotBlank: %v", err)
			}
		})
	}
	// Not available in Debian 12 as file-capable tools, so not made here:
	// hfs/hfs+ (hfsprogs is gone), udf, iso9660, bcache, zfs, bitlocker,
	// dm-integrity: their signatures lie in the checked first MiB (zfs
	// labels also in the last), see the package comment.
}

func luks(md string, zeroPrimary bool) func(t *testing.T, p string) {
	return func(t *testing.T, p string) {
		kf := filepath.Join(t.TempDir(), "k")
		if err := os.WriteFile(kf, []byte("k"), 0o600); err != nil {
			t.Fatal(err)
		}
		run(t, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
			"--luks2-metadata-size", md, "--key-file", kf, p)
		if zeroPrimary {
			f, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 16)
			_, err = f.ReadAt(b, 0)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			writeAt(t, p, make([]byte, binary.BigEndian.Uint64(b[8:])), 0)
		}
	}
}

// mdSuper is a version-1 md superblock's start (magic, major version).
func mdSuper(major uint32) []byte {
	b := make([]byte, 4096)
	binary.LittleEndian.PutUint32(b, 0xa92b4efc)
	binary.LittleEndian.PutUint32(b[4:], major)
	return b
}

// md090 is the start of a 0.90 superblock (magic, version 0.90.0).
func md090() []byte {
	b := make([]byte, 4096)
	binary.LittleEndian.PutUint32(b, 0xa92b4efc)
	binary.LittleEndian.PutUint32(b[8:], 90)
	return b
}
