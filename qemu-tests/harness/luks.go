package harness

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/crypto/xts"
)

// LUKS describes a LUKS2 volume made by `cryptsetup luksFormat` on a file.
// Keyslots use PBKDF2 with 1000 iterations: argon2 takes tens of seconds
// under TCG, and the keys are random anyway.
type LUKS struct {
	// Keys are the passphrases, one keyslot each: Keys[i] is in slot i.
	// At least one is required.
	Keys [][]byte
	// UUID of the LUKS header; empty derives a stable one.
	UUID string
	// Label of the LUKS2 header; empty means none.
	Label string
	// SectorSize is the encryption sector size, 512 (default) or 4096.
	SectorSize int
	// VolumeKey is the 64-byte AES-256-XTS master key; nil generates one.
	VolumeKey []byte
	// HeaderSize is the room before the data segment; 0 means 4 MiB
	// (16 keyslots). cryptsetup's own default is 16 MiB, which would leave
	// little of a small test partition.
	HeaderSize int64
	// UnboundSlot adds, after Keys, a keyslot made by `luksAddKey
	// --unbound` (a random passphrase and key that open no segment), with
	// priority "prefer" so that a boot would try it first if it tried it.
	UnboundSlot bool
}

// BuiltLUKS describes a LUKS2 volume as built. It holds key material: it
// exists for tests, which need it to check and change the volume.
type BuiltLUKS struct {
	// UUID (lower case) and Label of the LUKS2 header.
	UUID, Label string
	// Cipher is the data segment's cipher, e.g. aes-xts-plain64.
	Cipher string
	// SectorSize is the data segment's sector size.
	SectorSize int
	// VolumeKey is the master key.
	VolumeKey []byte
	// Keys maps keyslot numbers to their passphrases.
	Keys map[int][]byte
	// DataOffset is where the data segment starts in the partition.
	DataOffset int64
	// IVTweak is the segment's iv_tweak, added to plain64 sector numbers.
	IVTweak uint64
}

// pbkdfArgs are forced in full: cryptsetup would otherwise benchmark.
var pbkdfArgs = []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"}

func buildLUKS(ctx context.Context, work string, p Partition, bp *BuiltPartition, file string) (*BuiltLUKS, error) {
	l := p.LUKS
	if len(l.Keys) == 0 {
		return nil, errors.New("LUKS volume without keys")
	}
	ss := l.SectorSize
	if ss == 0 {
		ss = 512
	}
	if ss != 512 && ss != 4096 {
		return nil, fmt.Errorf("LUKS sector size %d, want 512 or 4096", ss)
	}
	hdr := l.HeaderSize
	if hdr == 0 {
		hdr = 4 * mib
	}
	if hdr%mib != 0 || hdr < mib || hdr >= bp.Size {
		return nil, fmt.Errorf("LUKS header size %d: want whole MiB below the partition size %d", hdr, bp.Size)
	}
	bl := &BuiltLUKS{UUID: l.UUID, Label: l.Label, VolumeKey: l.VolumeKey, Keys: map[int][]byte{}}
	if bl.UUID == "" {
		bl.UUID = strings.ToLower(deriveUUID("luks", bp.PartUUID))
	}
	if bl.VolumeKey == nil {
		bl.VolumeKey = make([]byte, 64)
		if _, err := rand.Read(bl.VolumeKey); err != nil {
			return nil, err
		}
	}
	if len(bl.VolumeKey) != 64 {
		return nil, fmt.Errorf("volume key is %d bytes, AES-256-XTS needs 64", len(bl.VolumeKey))
	}

	secrets, err := os.MkdirTemp(work, "keys-*")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(secrets)
	vk := filepath.Join(secrets, "volume-key")
	if err := os.WriteFile(vk, bl.VolumeKey, 0o600); err != nil {
		return nil, err
	}
	keyFiles := make([]string, len(l.Keys))
	for i, k := range l.Keys {
		keyFiles[i] = filepath.Join(secrets, fmt.Sprintf("key%d", i))
		if err := os.WriteFile(keyFiles[i], k, 0o600); err != nil {
			return nil, err
		}
	}

	if err := os.WriteFile(file, nil, 0o600); err != nil {
		return nil, err
	}
	if err := os.Truncate(file, bp.Size); err != nil {
		return nil, err
	}
	// Two 16 KiB metadata copies, then the keyslot area up to hdr.
	args := []string{"luksFormat", "--type", "luks2", "--batch-mode",
		"--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", strconv.Itoa(ss),
		"--volume-key-file", vk, "--key-file", keyFiles[0], "--key-slot", "0",
		"--uuid", bl.UUID, "--luks2-metadata-size", "16k",
		"--luks2-keyslots-size", strconv.FormatInt(hdr-32<<10, 10)}
	args = append(args, pbkdfArgs...)
	if l.Label != "" {
		args = append(args, "--label", l.Label)
	}
	if err := run(ctx, "cryptsetup", append(args, file)...); err != nil {
		return nil, err
	}
	bl.Keys[0] = l.Keys[0]
	for i := 1; i < len(l.Keys); i++ {
		args := append([]string{"luksAddKey", "--batch-mode", "--volume-key-file", vk, "--key-slot", strconv.Itoa(i)}, pbkdfArgs...)
		if err := run(ctx, "cryptsetup", append(args, file, keyFiles[i])...); err != nil {
			return nil, err
		}
		bl.Keys[i] = l.Keys[i]
	}
	if l.UnboundSlot {
		slot := strconv.Itoa(len(l.Keys))
		pass := make([]byte, 32)
		if _, err := rand.Read(pass); err != nil {
			return nil, err
		}
		pf := filepath.Join(secrets, "unbound")
		if err := os.WriteFile(pf, pass, 0o600); err != nil {
			return nil, err
		}
		args := append([]string{"luksAddKey", "--batch-mode", "--unbound", "--key-size", "512", "--key-slot", slot,
			"--key-file", keyFiles[0]}, pbkdfArgs...)
		if err := run(ctx, "cryptsetup", append(args, file, pf)...); err != nil {
			return nil, err
		}
		if err := run(ctx, "cryptsetup", "config", "--priority", "prefer", "--key-slot", slot, file); err != nil {
			return nil, err
		}
	}

	seg, err := readLUKS2Segment(file)
	if err != nil {
		return nil, err
	}
	bl.Cipher, bl.SectorSize, bl.DataOffset, bl.IVTweak = seg.Encryption, seg.SectorSize, seg.offset, seg.ivTweak
	if bl.Cipher != "aes-xts-plain64" || bl.SectorSize != ss || bl.DataOffset != hdr {
		return nil, fmt.Errorf("cryptsetup made segment %s/%d at %d, want aes-xts-plain64/%d at %d",
			bl.Cipher, bl.SectorSize, bl.DataOffset, ss, hdr)
	}

	if p.FS != nil {
		inner := filepath.Join(work, fmt.Sprintf("part%d.inner.img", bp.Number))
		fs, err := buildExt4(ctx, work, p.FS, bp.PartUUID+"/inner", bp.Size-bl.DataOffset, inner)
		if err != nil {
			return nil, err
		}
		defer os.Remove(inner)
		if err := encryptFile(inner, file, bl); err != nil {
			return nil, fmt.Errorf("encrypt ext4 into %s: %w", bp.Name, err)
		}
		bp.FS = fs
	}
	return bl, nil
}

// luks2Segment is the part of a LUKS2 data segment the harness needs.
type luks2Segment struct {
	Type       string `json:"type"`
	Offset     string `json:"offset"`
	Size       string `json:"size"`
	IVTweak    string `json:"iv_tweak"`
	Encryption string `json:"encryption"`
	SectorSize int    `json:"sector_size"`

	offset  int64
	ivTweak uint64
}

// readLUKS2Segment parses segment 0 from a LUKS2 header's JSON area
// (after the 4 KiB binary header, up to hdr_size).
func readLUKS2Segment(path string) (luks2Segment, error) {
	var seg luks2Segment
	f, err := os.Open(path)
	if err != nil {
		return seg, err
	}
	defer f.Close()
	bin := make([]byte, 4096)
	if _, err := io.ReadFull(f, bin); err != nil {
		return seg, fmt.Errorf("LUKS2 header of %s: %w", path, err)
	}
	if !bytes.Equal(bin[:6], []byte("LUKS\xba\xbe")) || binary.BigEndian.Uint16(bin[6:]) != 2 {
		return seg, fmt.Errorf("%s: no LUKS2 header", path)
	}
	hdrSize := binary.BigEndian.Uint64(bin[8:])
	if hdrSize <= 4096 || hdrSize > 4<<20 {
		return seg, fmt.Errorf("%s: LUKS2 hdr_size %d", path, hdrSize)
	}
	area := make([]byte, hdrSize-4096)
	if _, err := io.ReadFull(f, area); err != nil {
		return seg, fmt.Errorf("LUKS2 JSON of %s: %w", path, err)
	}
	if i := bytes.IndexByte(area, 0); i >= 0 {
		area = area[:i]
	}
	var meta struct {
		Segments map[string]luks2Segment `json:"segments"`
	}
	if err := json.Unmarshal(area, &meta); err != nil {
		return seg, fmt.Errorf("LUKS2 JSON of %s: %w", path, err)
	}
	seg, ok := meta.Segments["0"]
	if !ok || len(meta.Segments) != 1 || seg.Type != "crypt" {
		return seg, fmt.Errorf("%s: want one crypt segment, have %v", path, meta.Segments)
	}
	if seg.offset, err = strconv.ParseInt(seg.Offset, 10, 64); err != nil {
		return seg, fmt.Errorf("%s: segment offset: %w", path, err)
	}
	if seg.ivTweak, err = strconv.ParseUint(seg.IVTweak, 10, 64); err != nil {
		return seg, fmt.Errorf("%s: segment iv_tweak: %w", path, err)
	}
	return seg, nil
}

// xtsVolume is dm-crypt's aes-xts-plain64 in userspace. plain64 numbers
// 512-byte units from the segment start (plus iv_tweak) even when the
// data unit is a 4096-byte sector: LUKS2 doesn't set iv_large_sectors.
type xtsVolume struct {
	c          *xts.Cipher
	sectorSize int
	ivTweak    uint64
}

func newXTSVolume(l *BuiltLUKS) (*xtsVolume, error) {
	if l.Cipher != "aes-xts-plain64" {
		return nil, fmt.Errorf("cipher %s: only aes-xts-plain64 is supported", l.Cipher)
	}
	c, err := xts.NewCipher(aes.NewCipher, l.VolumeKey)
	if err != nil {
		return nil, err
	}
	return &xtsVolume{c: c, sectorSize: l.SectorSize, ivTweak: l.IVTweak}, nil
}

// crypt en- or decrypts buf in place; off is buf's byte offset in the
// segment. Both must be whole sectors.
func (v *xtsVolume) crypt(buf []byte, off int64, encrypt bool) error {
	if len(buf)%v.sectorSize != 0 || off%int64(v.sectorSize) != 0 {
		return fmt.Errorf("%d bytes at %d: not whole %d-byte sectors", len(buf), off, v.sectorSize)
	}
	for i := 0; i < len(buf); i += v.sectorSize {
		s := buf[i : i+v.sectorSize]
		iv := uint64(off+int64(i))/512 + v.ivTweak
		if encrypt {
			v.c.Encrypt(s, s, iv)
		} else {
			v.c.Decrypt(s, s, iv)
		}
	}
	return nil
}

// encryptFile encrypts the plaintext image src into the data segment of
// the LUKS volume file dst.
func encryptFile(src, dst string, l *BuiltLUKS) error {
	v, err := newXTSVolume(l)
	if err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer out.Close()
	buf := make([]byte, mib)
	var off int64
	for {
		n, rerr := io.ReadFull(in, buf)
		if n > 0 {
			if err := v.crypt(buf[:n], off, true); err != nil {
				return err
			}
			if _, err := out.WriteAt(buf[:n], l.DataOffset+off); err != nil {
				return err
			}
			off += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	return out.Close()
}

// luksPartition returns a LUKS partition or an error naming it.
func (d *BuiltDisk) luksPartition(name string) (*BuiltPartition, error) {
	p, err := d.Partition(name)
	if err != nil {
		return nil, err
	}
	if p.LUKS == nil {
		return nil, fmt.Errorf("harness: partition %s of %s is not LUKS", name, d.Path)
	}
	return p, nil
}

// Decrypt returns the plaintext of a LUKS partition's data segment as it
// is in the image now (e.g. to check the swap signature a boot wrote).
func (d *BuiltDisk) Decrypt(name string) ([]byte, error) {
	p, err := d.luksPartition(name)
	if err != nil {
		return nil, err
	}
	v, err := newXTSVolume(p.LUKS)
	if err != nil {
		return nil, fmt.Errorf("harness: decrypt %s: %w", name, err)
	}
	b, err := readAt(d.Path, p.Offset+p.LUKS.DataOffset, p.Size-p.LUKS.DataOffset)
	if err != nil {
		return nil, fmt.Errorf("harness: decrypt %s of %s: %w", name, d.Path, err)
	}
	if err := v.crypt(b, 0, false); err != nil {
		return nil, fmt.Errorf("harness: decrypt %s: %w", name, err)
	}
	return b, nil
}

// AddKey adds a passphrase to a LUKS partition of the image (authorised by
// the volume key) and returns its keyslot, for key-rotation tests.
func (d *BuiltDisk) AddKey(ctx context.Context, name string, key []byte) (int, error) {
	p, err := d.luksPartition(name)
	if err != nil {
		return 0, err
	}
	slot := 0
	for ; p.LUKS.Keys[slot] != nil; slot++ {
	}
	err = d.editHeader(ctx, p, func(hdr, secrets string) error {
		vk := filepath.Join(secrets, "volume-key")
		kf := filepath.Join(secrets, "new-key")
		if err := os.WriteFile(vk, p.LUKS.VolumeKey, 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(kf, key, 0o600); err != nil {
			return err
		}
		args := append([]string{"luksAddKey", "--batch-mode", "--volume-key-file", vk, "--key-slot", strconv.Itoa(slot)}, pbkdfArgs...)
		return run(ctx, "cryptsetup", append(args, hdr, kf)...)
	})
	if err != nil {
		return 0, fmt.Errorf("harness: add key to %s: %w", name, err)
	}
	p.LUKS.Keys[slot] = append([]byte(nil), key...)
	return slot, nil
}

// KillSlot removes a keyslot from a LUKS partition of the image.
func (d *BuiltDisk) KillSlot(ctx context.Context, name string, slot int) error {
	p, err := d.luksPartition(name)
	if err != nil {
		return err
	}
	err = d.editHeader(ctx, p, func(hdr, _ string) error {
		return run(ctx, "cryptsetup", "luksKillSlot", "--batch-mode", hdr, strconv.Itoa(slot))
	})
	if err != nil {
		return fmt.Errorf("harness: kill slot %d of %s: %w", slot, name, err)
	}
	delete(p.LUKS.Keys, slot)
	return nil
}

// Slots returns the keyslots the harness knows to be in use, sorted.
func (l *BuiltLUKS) Slots() []int {
	var s []int
	for k := range l.Keys {
		s = append(s, k)
	}
	sort.Ints(s)
	return s
}

// editHeader lets cryptsetup change a LUKS header in the image: the header
// region is copied to a file of its own (cryptsetup can't address a
// partition inside an image without a loop device), edited, copied back.
func (d *BuiltDisk) editHeader(ctx context.Context, p *BuiltPartition, edit func(hdr, secrets string) error) error {
	work, err := os.MkdirTemp(filepath.Dir(d.Path), ".luks-edit-*")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	b, err := readAt(d.Path, p.Offset, p.LUKS.DataOffset)
	if err != nil {
		return err
	}
	hdr := filepath.Join(work, "header.img")
	if err := os.WriteFile(hdr, b, 0o600); err != nil {
		return err
	}
	if err := edit(hdr, work); err != nil {
		return err
	}
	nb, err := os.ReadFile(hdr)
	if err != nil {
		return err
	}
	if int64(len(nb)) != p.LUKS.DataOffset {
		return fmt.Errorf("header grew from %d to %d bytes", p.LUKS.DataOffset, len(nb))
	}
	return writeAt(d.Path, p.Offset, nb)
}
