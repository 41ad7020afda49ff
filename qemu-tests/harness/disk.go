package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"unicode/utf16"
)

// Disk describes a GPT disk image. Build writes it without root, loop
// devices or device-mapper: each partition is made as a file of its own
// (mke2fs -d, cryptsetup on a file, userspace AES-XTS) and copied in.
type Disk struct {
	// GUID is the disk GUID; empty derives one from the partition names.
	GUID string
	// Partitions are laid out in order from 1 MiB, each 1 MiB aligned.
	Partitions []Partition
}

// Partition is one GPT partition. With LUKS set it is a LUKS2 volume
// (holding FS, if set); with only FS it is a plain ext4 file system; with
// neither it is raw (Raw at its start, zeros after).
type Partition struct {
	// Name is the GPT partition name, i.e. the PARTLABEL.
	Name string
	// Size in bytes, rounded up to a MiB.
	Size int64
	// PartUUID is the partition's unique GUID; empty derives a stable one.
	PartUUID string
	// Type is the partition type GUID; empty means TypeLinuxSwap when Swap
	// is set, else TypeLinuxFS.
	Type string
	// Swap marks a swap partition. Its content stays empty: the init
	// under test writes the swap signature after unlocking.
	Swap bool
	// FS is the ext4 file system on the partition, or inside LUKS.
	FS *Ext4
	// LUKS makes the partition a LUKS2 volume.
	LUKS *LUKS
	// Raw is written at the start of a raw partition.
	Raw []byte
}

// BuiltDisk is a disk image Build wrote, with what a test needs to know
// about it.
type BuiltDisk struct {
	// Path of the raw image.
	Path string
	// Size of the image in bytes.
	Size int64
	// GUID is the disk GUID.
	GUID string
	// Partitions in table order: Partitions[i] is partition number i+1.
	Partitions []*BuiltPartition
}

// BuiltPartition describes one partition of a BuiltDisk.
type BuiltPartition struct {
	// Number is the partition number (vda<Number> in the guest).
	Number int
	// Name is the PARTLABEL.
	Name string
	// PartUUID is the partition's unique GUID (upper case).
	PartUUID string
	// Type is the partition type GUID.
	Type string
	// Offset and Size locate the partition in the image, in bytes.
	Offset, Size int64
	// FS is the ext4 file system (plain, or inside LUKS), if any.
	FS *BuiltFS
	// LUKS is the LUKS2 volume, if any.
	LUKS *BuiltLUKS
}

// BuiltFS identifies an ext4 file system.
type BuiltFS struct {
	// Label and UUID as in LABEL= and UUID= (UUID in lower case).
	Label, UUID string
}

// Build writes the disk as dir/disk.img (replacing it) and returns its
// description. Temporary files, including key files cryptsetup needs, go
// to a private directory under dir that is removed afterwards.
func (d Disk) Build(ctx context.Context, dir string) (*BuiltDisk, error) {
	return d.BuildFile(ctx, filepath.Join(dir, "disk.img"))
}

// BuildFile is Build with an explicit image path.
func (d Disk) BuildFile(ctx context.Context, path string) (*BuiltDisk, error) {
	if err := d.validate(); err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(filepath.Dir(path), ".disk-build-*")
	if err != nil {
		return nil, fmt.Errorf("harness: disk %s: %w", path, err)
	}
	defer os.RemoveAll(work)

	bd := &BuiltDisk{Path: path, GUID: d.GUID}
	if bd.GUID == "" {
		var names []string
		for _, p := range d.Partitions {
			names = append(names, p.Name)
		}
		bd.GUID = deriveUUID(append([]string{"disk"}, names...)...)
	}
	offset := int64(mib)
	var entries []gptEntry
	var files []string
	for i, p := range d.Partitions {
		bp := &BuiltPartition{
			Number:   i + 1,
			Name:     p.Name,
			PartUUID: p.PartUUID,
			Type:     p.Type,
			Offset:   offset,
			Size:     roundUp(p.Size, mib),
		}
		if bp.PartUUID == "" {
			bp.PartUUID = deriveUUID("partition", bd.GUID, p.Name)
		}
		if bp.Type == "" {
			bp.Type = TypeLinuxFS
			if p.Swap {
				bp.Type = TypeLinuxSwap
			}
		}
		file := filepath.Join(work, fmt.Sprintf("part%d.img", bp.Number))
		if err := buildPartition(ctx, work, p, bp, file); err != nil {
			return nil, fmt.Errorf("harness: partition %d (%s): %w", bp.Number, p.Name, err)
		}
		entries = append(entries, gptEntry{
			typeGUID:   bp.Type,
			uniqueGUID: bp.PartUUID,
			firstLBA:   uint64(bp.Offset / sectorSize),
			lastLBA:    uint64((bp.Offset+bp.Size)/sectorSize - 1),
			name:       p.Name,
		})
		files = append(files, file)
		bd.Partitions = append(bd.Partitions, bp)
		offset += bp.Size
	}
	// 1 MiB at the end leaves room for the backup table and keeps the
	// size MiB aligned, as partitioning tools do.
	bd.Size = offset + mib

	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("harness: disk %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("harness: disk %s: %w", path, err)
	}
	defer f.Close()
	if err := f.Truncate(bd.Size); err != nil {
		return nil, fmt.Errorf("harness: disk %s: %w", path, err)
	}
	if err := writeGPT(f, bd.Size, bd.GUID, entries); err != nil {
		return nil, fmt.Errorf("harness: disk %s: GPT: %w", path, err)
	}
	for i, bp := range bd.Partitions {
		if err := copySparse(f, bp.Offset, files[i], bp.Size); err != nil {
			return nil, fmt.Errorf("harness: disk %s: partition %d (%s): %w", path, bp.Number, bp.Name, err)
		}
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("harness: disk %s: %w", path, err)
	}
	return bd, nil
}

func (d Disk) validate() error {
	if len(d.Partitions) == 0 {
		return errors.New("harness: disk without partitions")
	}
	seen := map[string]bool{}
	for i, p := range d.Partitions {
		switch {
		case p.Name == "":
			return fmt.Errorf("harness: partition %d: no name (PARTLABEL)", i+1)
		case seen[p.Name]:
			return fmt.Errorf("harness: partition %d: name %q used twice", i+1, p.Name)
		case p.Size <= 0:
			return fmt.Errorf("harness: partition %d (%s): size %d", i+1, p.Name, p.Size)
		case p.Raw != nil && (p.FS != nil || p.LUKS != nil):
			return fmt.Errorf("harness: partition %d (%s): Raw with FS or LUKS", i+1, p.Name)
		case int64(len(p.Raw)) > roundUp(p.Size, mib):
			return fmt.Errorf("harness: partition %d (%s): Raw larger than the partition", i+1, p.Name)
		case len(utf16.Encode([]rune(p.Name))) > gptNameUnits:
			return fmt.Errorf("harness: partition %d (%s): name longer than %d UTF-16 units", i+1, p.Name, gptNameUnits)
		}
		for what, g := range map[string]string{"PARTUUID": p.PartUUID, "type": p.Type} {
			if _, err := guidBytes(g); g != "" && err != nil {
				return fmt.Errorf("harness: partition %d (%s): %s: %w", i+1, p.Name, what, err)
			}
		}
		seen[p.Name] = true
	}
	return nil
}

func buildPartition(ctx context.Context, work string, p Partition, bp *BuiltPartition, file string) error {
	switch {
	case p.LUKS != nil:
		l, err := buildLUKS(ctx, work, p, bp, file)
		if err != nil {
			return err
		}
		bp.LUKS = l
		return nil
	case p.FS != nil:
		fs, err := buildExt4(ctx, work, p.FS, bp.PartUUID, bp.Size, file)
		if err != nil {
			return err
		}
		bp.FS = fs
		return nil
	default:
		if err := os.WriteFile(file, p.Raw, 0o600); err != nil {
			return err
		}
		return os.Truncate(file, bp.Size)
	}
}

// copySparse copies a partition file into the image, skipping zero blocks
// so the image stays sparse (the image is fresh, so they are zero already).
func copySparse(dst io.WriterAt, off int64, src string, size int64) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return err
	} else if st.Size() > size {
		return fmt.Errorf("%s is %d bytes, partition %d", src, st.Size(), size)
	}
	buf := make([]byte, mib)
	zero := make([]byte, 64<<10)
	var pos int64
	for {
		n, err := io.ReadFull(f, buf)
		for i := 0; i < n; i += len(zero) {
			chunk := buf[i:min(i+len(zero), n)]
			if bytes.Equal(chunk, zero[:len(chunk)]) {
				continue
			}
			if _, werr := dst.WriteAt(chunk, off+pos+int64(i)); werr != nil {
				return werr
			}
		}
		pos += int64(n)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func roundUp(n, to int64) int64 {
	return (n + to - 1) / to * to
}

// Partition returns the partition named name (its PARTLABEL).
func (d *BuiltDisk) Partition(name string) (*BuiltPartition, error) {
	for _, p := range d.Partitions {
		if p.Name == name {
			return p, nil
		}
	}
	return nil, fmt.Errorf("harness: disk %s has no partition %q", d.Path, name)
}

// ReadPartition returns a partition's bytes as they are in the image now,
// e.g. to prove a failed boot wrote nothing.
func (d *BuiltDisk) ReadPartition(name string) ([]byte, error) {
	p, err := d.Partition(name)
	if err != nil {
		return nil, err
	}
	b, err := readAt(d.Path, p.Offset, p.Size)
	if err != nil {
		return nil, fmt.Errorf("harness: read partition %s of %s: %w", name, d.Path, err)
	}
	return b, nil
}

func readAt(path string, off, size int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, size)
	if _, err := f.ReadAt(b, off); err != nil {
		return nil, err
	}
	return b, nil
}

func writeAt(path string, off int64, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(b, off); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Device returns the guest's device path for a partition when the image
// is the only (or first) virtio disk.
func (p *BuiltPartition) Device() string {
	return "/dev/vda" + strconv.Itoa(p.Number)
}
