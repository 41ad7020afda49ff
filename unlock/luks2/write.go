package luks2

import (
	"bytes"
	"cmp"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/unlockrd/unlockrd/unlock/secret"
	"golang.org/x/crypto/xts"
)

// The writers: Format makes a new volume, AddKeyslot and RemoveKeyslot
// rotate its key. Every header update follows LUKS2's own rules, so that a
// power cut at any write leaves something both cryptsetup and ReadHeader
// open with the old key or the new one:
//
//   - a keyslot's area is written and synced before any metadata names it,
//     and a removed keyslot's area is wiped only after the metadata that
//     named it is gone;
//   - each update raises the sequence id and writes both header copies,
//     the secondary first (its JSON area, then its binary header), each
//     write followed by Sync; while the primary is still the older copy the
//     secondary's higher sequence id makes it the one used.
//
// A new volume cannot be written in one atomic step (the header alone is
// 32 sectors in the first MiB, which unlock/blank requires to be zero), so
// Format first writes a marker sector (BeginFormat) where the secondary
// header's binary header goes: until the secondary is complete, the device
// is recognisably ours and unfinished (Unfinished), never a half-written
// header that looks like someone's volume. The marker is not a LUKS2
// header (no checksum); the secondary's binary header replaces it last.

// Device is what the writers need: a block device or an image file.
type Device interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
}

// What Format writes: cryptsetup's luksFormat defaults, except the
// keyslot's KDF, which is the minimal PBKDF2 DESIGN §6 prescribes for
// machine-held random keys (cryptsetup --pbkdf pbkdf2
// --pbkdf-force-iterations 1000).
const (
	// FormatCipher is the data segment's and the keyslot area's cipher.
	FormatCipher = "aes-xts-plain64"
	// VolumeKeyBytes is the volume key size: 512-bit aes-xts.
	VolumeKeyBytes = 64
	// PBKDF2Iterations is the keyslot KDF cost (and the digest's, which is
	// cryptsetup's minimum): the keys are random, they need no stretching.
	PBKDF2Iterations = 1000
	fmtHash          = "sha256"
	fmtHdrSize       = 16 << 10 // one header copy: cryptsetup's default
	fmtDataOffset    = 16 << 20 // cryptsetup's default data offset
	saltBytes        = 32
	digestBytes      = 32
	// areaAlign is what cryptsetup rounds keyslot areas up to.
	areaAlign = 4096
)

// FormatOptions say how Format lays out a new volume.
type FormatOptions struct {
	UUID  string // "" = random v4
	Label string
	// SectorSize is the data segment's encryption sector: 512 or 4096
	// (1024 and 2048 are taken too); 0 = 4096. The caller decides from
	// the device's logical block size.
	SectorSize int
	// TailReserve is how many bytes at the end of the device stay outside
	// the data segment (which then gets a fixed size instead of
	// "dynamic"); 0 = dynamic.
	TailReserve int64
	Rand        io.Reader // nil = crypto/rand
}

// SegmentLayout is where Format puts things on a device: everything a
// dm-crypt table over the data segment needs, known before Format runs.
type SegmentLayout struct {
	Offset     int64 // data segment start, bytes
	Size       int64 // data segment length on this device, bytes
	Dynamic    bool  // the header says "dynamic" (no TailReserve)
	SectorSize int   // encryption sector size
	Cipher     string
	KeyBytes   int // volume key size
	// HeaderSize is one header copy; KeyslotsSize the keyslots area
	// after both copies; Keyslot0 the area of the first keyslot.
	HeaderSize   int64
	KeyslotsSize int64
	Keyslot0     Area
}

// Layout is the layout Format uses for a device of size bytes.
func Layout(size int64, opt FormatOptions) (SegmentLayout, error) {
	ss := opt.SectorSize
	if ss == 0 {
		ss = 4096
	}
	if ss != 512 && ss != 1024 && ss != 2048 && ss != 4096 {
		return SegmentLayout{}, fmt.Errorf("format: sector size %d (want 512 or 4096)", opt.SectorSize)
	}
	if opt.TailReserve < 0 || opt.TailReserve%512 != 0 {
		return SegmentLayout{}, fmt.Errorf("format: tail reserve %d is not a non-negative multiple of 512", opt.TailReserve)
	}
	l := SegmentLayout{
		Offset: fmtDataOffset, SectorSize: ss, Cipher: FormatCipher, KeyBytes: VolumeKeyBytes,
		HeaderSize: fmtHdrSize, KeyslotsSize: fmtDataOffset - 2*fmtHdrSize, Dynamic: opt.TailReserve == 0,
		Keyslot0: Area{Type: "raw", Encryption: FormatCipher, KeySize: VolumeKeyBytes, Offset: 2 * fmtHdrSize, Size: areaSize(VolumeKeyBytes)},
	}
	if size-l.Offset <= opt.TailReserve {
		return SegmentLayout{}, fmt.Errorf("format: device of %d bytes has no room for a data segment at %d with %d bytes reserved at the end", size, l.Offset, opt.TailReserve)
	}
	l.Size = (size - l.Offset - opt.TailReserve) / int64(ss) * int64(ss)
	if l.Size < int64(ss) {
		return SegmentLayout{}, fmt.Errorf("format: device of %d bytes leaves less than one %d-byte sector for data", size, ss)
	}
	return l, nil
}

// areaSize is a keyslot area for a key of n bytes, as cryptsetup sizes it.
func areaSize(n int) int64 {
	return (int64(n)*afStripes + areaAlign - 1) / areaAlign * areaAlign
}

// DataOffset returns where the data segment starts (what a dm-crypt table
// needs) and its length on a device of devSize bytes.
func (h *Header) DataOffset(devSize int64) (offset, size int64, err error) {
	if len(h.Segments) != 1 {
		return 0, 0, fmt.Errorf("%d data segments, want 1", len(h.Segments))
	}
	s := h.Segments[0]
	n, err := s.SizeBytes(devSize)
	if err != nil {
		return 0, 0, err
	}
	return s.Offset, n, nil
}

// NewVolumeKey returns a fresh random 512-bit aes-xts volume key.
func NewVolumeKey(rand io.Reader) (*secret.Buf, error) {
	k := secret.New(VolumeKeyBytes)
	if _, err := io.ReadFull(randOr(rand), k.Bytes()); err != nil {
		k.Wipe()
		return nil, fmt.Errorf("volume key: random source: %v", err)
	}
	return k, nil
}

func randOr(r io.Reader) io.Reader {
	if r == nil {
		return crand.Reader
	}
	return r
}

// uuidRE is the UUID spelling cryptsetup accepts for --uuid.
var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// stampSubsystem marks the sector BeginFormat writes: no header cryptsetup
// or we write carries it, and the sector has no checksum.
const stampSubsystem = "unlockrd: format unfinished"

// stamp is the binary header sector BeginFormat writes at hdrSize: the
// secondary's magic, version and offsets, the marker, no checksum.
func stamp(hdrSize int64) []byte {
	b := make([]byte, luks2BinSize)
	copy(b, luksMagic2)
	binary.BigEndian.PutUint16(b[6:], 2)
	binary.BigEndian.PutUint64(b[8:], uint64(hdrSize))
	copy(b[0x48:], fmtHash)
	copy(b[0xd0:], stampSubsystem)
	binary.BigEndian.PutUint64(b[0x100:], uint64(hdrSize))
	return b
}

// ErrNotOurs is wrapped when a device's header area holds something other
// than nothing or our own unfinished format: it is never written to.
var ErrNotOurs = errors.New("not blank and not an unfinished format of ours")

// headerZone reads both header copies and says whether the primary is
// all zero and the secondary's binary header is the stamp.
func headerZone(r io.ReaderAt, hdrSize int64) (zone []byte, stamped bool, err error) {
	zone = make([]byte, 2*hdrSize)
	if _, err := r.ReadAt(zone, 0); err != nil {
		return nil, false, fmt.Errorf("read header area: %v", err)
	}
	return zone, bytes.Equal(zone[hdrSize:hdrSize+luks2BinSize], stamp(hdrSize)), nil
}

// BeginFormat writes Format's marker (see Unfinished) and returns the
// layout Format will use. A boot that writes the data segment before the
// header (dm-crypt mapping and mkfs first, then Format) calls it before
// writing anything, so that a power cut from here on leaves a device
// Unfinished recognises. The header area must be all zero or already
// carry the marker.
func BeginFormat(ctx context.Context, dev Device, size int64, opt FormatOptions) (SegmentLayout, error) {
	l, err := Layout(size, opt)
	if err != nil {
		return l, err
	}
	if err := ctx.Err(); err != nil {
		return l, fmt.Errorf("format: %w", err)
	}
	zone, stamped, err := headerZone(dev, l.HeaderSize)
	if err != nil {
		return l, fmt.Errorf("format: %w", err)
	}
	if err := zoneBlank(zone, l.HeaderSize, stamped); err != nil {
		return l, err
	}
	if stamped {
		return l, nil
	}
	return l, writeSync(dev, stamp(l.HeaderSize), l.HeaderSize, "format marker")
}

// zoneBlank refuses a header area that holds anything but zeros, the
// stamp, and (after the stamp) a JSON area an interrupted Format wrote.
func zoneBlank(zone []byte, hdrSize int64, stamped bool) error {
	end := len(zone)
	if stamped {
		end = int(hdrSize)
	}
	if i := slices.IndexFunc(zone[:end], func(c byte) bool { return c != 0 }); i >= 0 {
		return fmt.Errorf("format: refusing: non-zero byte at %d in the LUKS2 header area: %w", i, ErrNotOurs)
	}
	return nil
}

// Unfinished returns nil when r (size bytes) holds an unfinished Format
// of ours and nothing else: no valid LUKS2 header copy, the primary
// header area all zero, Format's marker where the secondary's binary
// header goes, the rest of the first MiB outside the first keyslot's area
// all zero, and the bytes after the data segment (TailReserve) all zero.
// What lies in the first keyslot's area, the secondary's JSON area and the
// data segment is not looked at: Format (and a caller that maps the
// segment before Format) wrote there after the marker. The marker is the
// positive evidence that the device was blank when this started; a boot
// may format such a device again from scratch.
func Unfinished(r io.ReaderAt, size int64, opt FormatOptions) error {
	l, err := Layout(size, opt)
	if err != nil {
		return err
	}
	if h, err := ReadHeader(r); err == nil {
		return fmt.Errorf("holds a LUKS2 volume (UUID %s): %w", h.UUID, ErrNotOurs)
	}
	zone, stamped, err := headerZone(r, l.HeaderSize)
	if err != nil {
		return err
	}
	if !stamped {
		return fmt.Errorf("no format marker at %d: %w", l.HeaderSize, ErrNotOurs)
	}
	if i := slices.IndexFunc(zone[:l.HeaderSize], func(c byte) bool { return c != 0 }); i >= 0 {
		return fmt.Errorf("non-zero byte at %d in the primary header area: %w", i, ErrNotOurs)
	}
	check := func(off, n int64) error {
		if n <= 0 {
			return nil
		}
		b := make([]byte, n)
		if _, err := r.ReadAt(b, off); err != nil {
			return fmt.Errorf("read %d bytes at %d: %v", n, off, err)
		}
		if i := slices.IndexFunc(b, func(c byte) bool { return c != 0 }); i >= 0 {
			return fmt.Errorf("non-zero byte at %d: %w", off+int64(i), ErrNotOurs)
		}
		return nil
	}
	ksEnd := l.Keyslot0.Offset + l.Keyslot0.Size
	if err := check(ksEnd, min(1<<20, l.Offset)-ksEnd); err != nil {
		return err
	}
	tail := l.Offset + l.Size
	return check(tail, min(size-tail, 1<<20))
}

// Format writes a complete LUKS2 header (both copies) for volumeKey with
// one keyslot (id 0) for passphrase: aes-xts-plain64, minimal PBKDF2
// (DESIGN §6), digest pbkdf2, laid out as Layout(size, opt) says. It does
// not touch the data segment. The header area must be all zero or hold an
// unfinished Format (BeginFormat's marker); anything else is refused.
//
// Writes, each followed by Sync: the marker (unless BeginFormat wrote
// it), keyslot 0's area, the secondary's JSON area, the secondary's
// binary header (from here on the volume opens), the primary copy.
func Format(ctx context.Context, dev Device, size int64, volumeKey, passphrase *secret.Buf, opt FormatOptions) (*Header, error) {
	return formatDev(ctx, dev, size, volumeKey, passphrase, opt, nil)
}

func formatDev(ctx context.Context, dev Device, size int64, volumeKey, passphrase *secret.Buf, opt FormatOptions, sc *scratch) (*Header, error) {
	l, err := Layout(size, opt)
	if err != nil {
		return nil, err
	}
	if volumeKey.Len() != VolumeKeyBytes {
		return nil, fmt.Errorf("format: volume key of %d bytes, want %d", volumeKey.Len(), VolumeKeyBytes)
	}
	if passphrase.Len() == 0 {
		return nil, errors.New("format: empty passphrase")
	}
	rnd := randOr(opt.Rand)
	uuid := opt.UUID
	if uuid == "" {
		if uuid, err = newUUID(rnd); err != nil {
			return nil, err
		}
	}
	if !uuidRE.MatchString(uuid) {
		return nil, fmt.Errorf("format: UUID %q is not a UUID", uuid)
	}
	if len(opt.Label) >= 48 || strings.IndexByte(opt.Label, 0) >= 0 {
		return nil, fmt.Errorf("format: label %q is longer than 47 bytes or holds a NUL", opt.Label)
	}
	if _, err := BeginFormat(ctx, dev, size, opt); err != nil {
		return nil, err
	}
	ks, area, err := sealKeyslot(ctx, volumeKey, passphrase, l.Keyslot0, rnd, sc)
	if err != nil {
		return nil, fmt.Errorf("format: %w", err)
	}
	defer clear(area)
	dsalt, err := randBytes(rnd, saltBytes)
	if err != nil {
		return nil, err
	}
	dg, err := pbkdf2Key(ctx, sha256.New, volumeKey.Bytes(), dsalt, PBKDF2Iterations, digestBytes, sc)
	if err != nil {
		return nil, fmt.Errorf("format: digest: %w", err)
	}
	digest := bytes.Clone(dg.Bytes()) // public: it is written to the header
	dg.Wipe()
	segSize := "dynamic"
	if !l.Dynamic {
		segSize = strconv.FormatInt(l.Size, 10)
	}
	meta := jobj{
		"keyslots": jobj{"0": ks},
		"tokens":   jobj{},
		"segments": jobj{"0": jobj{
			"type": "crypt", "offset": strconv.FormatInt(l.Offset, 10), "size": segSize,
			"iv_tweak": "0", "encryption": l.Cipher, "sector_size": l.SectorSize,
		}},
		"digests": jobj{"0": jobj{
			"type": "pbkdf2", "keyslots": []any{"0"}, "segments": []any{"0"}, "hash": fmtHash,
			"iterations": PBKDF2Iterations, "salt": b64(dsalt), "digest": b64(digest),
		}},
		"config": jobj{
			"json_size":     strconv.FormatInt(l.HeaderSize-luks2BinSize, 10),
			"keyslots_size": strconv.FormatInt(l.KeyslotsSize, 10),
		},
	}
	bin := make([]byte, luks2BinSize)
	copy(bin[0x18:], opt.Label)
	copy(bin[0x48:], fmtHash)
	copy(bin[0xa8:], uuid)
	salt, err := randBytes(rnd, 64)
	if err != nil {
		return nil, err
	}
	copy(bin[0x68:], salt)
	if err := writeSync(dev, area, l.Keyslot0.Offset, "keyslot 0 area"); err != nil {
		return nil, fmt.Errorf("format: %w", err)
	}
	h, err := commit(ctx, dev, bin, meta, l.HeaderSize, 1)
	if err != nil {
		return nil, fmt.Errorf("format: %w", err)
	}
	return h, nil
}

func newUUID(rnd io.Reader) (string, error) {
	u, err := randBytes(rnd, 16)
	if err != nil {
		return "", err
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}

func randBytes(rnd io.Reader, n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := io.ReadFull(rnd, b); err != nil {
		return nil, fmt.Errorf("random source: %v", err)
	}
	return b, nil
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func writeSync(dev Device, b []byte, off int64, what string) error {
	if _, err := dev.WriteAt(b, off); err != nil {
		return fmt.Errorf("write %s (%d bytes at %d): %v", what, len(b), off, err)
	}
	if err := dev.Sync(); err != nil {
		return fmt.Errorf("sync after writing %s: %v", what, err)
	}
	return nil
}

// sealKeyslot makes keyslot metadata and its encrypted area for
// volumeKey under passphrase: PBKDF2 area key, anti-forensic split,
// aes-xts-plain64 with 512-byte sectors numbered from the area's start.
// The returned area is ciphertext; every intermediate is wiped.
func sealKeyslot(ctx context.Context, volumeKey, passphrase *secret.Buf, a Area, rnd io.Reader, sc *scratch) (jobj, []byte, error) {
	n := volumeKey.Len()
	if int64(n)*afStripes > a.Size {
		return nil, nil, fmt.Errorf("keyslot area of %d bytes is too small for a %d-byte key", a.Size, n)
	}
	salt, err := randBytes(rnd, saltBytes)
	if err != nil {
		return nil, nil, err
	}
	area := make([]byte, a.Size)
	sc.keepBuf(area)
	if err := afSplit(area[:n*afStripes], volumeKey.Bytes(), sha256.New, rnd, sc); err != nil {
		clear(area)
		return nil, nil, err
	}
	// The tail after the split material is random too, as cryptsetup
	// leaves no recognisable pattern there.
	if _, err := io.ReadFull(rnd, area[n*afStripes:]); err != nil {
		clear(area)
		return nil, nil, fmt.Errorf("random source: %v", err)
	}
	ak, err := pbkdf2Key(ctx, sha256.New, passphrase.Bytes(), salt, PBKDF2Iterations, a.KeySize, sc)
	if err != nil {
		clear(area)
		return nil, nil, err
	}
	sc.keepBuf(ak.Bytes())
	err = encryptArea(a.Encryption, ak.Bytes(), area)
	ak.Wipe()
	if err != nil {
		clear(area)
		return nil, nil, err
	}
	ks := jobj{
		"type": "luks2", "key_size": n,
		"af": jobj{"type": "luks1", "stripes": afStripes, "hash": fmtHash},
		"area": jobj{
			"type": "raw", "offset": strconv.FormatInt(a.Offset, 10), "size": strconv.FormatInt(a.Size, 10),
			"encryption": a.Encryption, "key_size": a.KeySize,
		},
		"kdf": jobj{"type": "pbkdf2", "hash": fmtHash, "iterations": PBKDF2Iterations, "salt": b64(salt)},
	}
	return ks, area, nil
}

// afSplit is LUKS's anti-forensic split of key into dst (stripes blocks):
// random blocks, each XORed into a running buffer diffused with the hash,
// and a last block that XORs the buffer back to the key (afMerge undoes
// it).
func afSplit(dst, key []byte, newHash func() hash.Hash, rnd io.Reader, sc *scratch) error {
	n := len(key)
	stripes := len(dst) / n
	if n == 0 || stripes < 1 || len(dst) != n*stripes {
		return fmt.Errorf("anti-forensic split of %d bytes into %d", n, len(dst))
	}
	if _, err := io.ReadFull(rnd, dst[:n*(stripes-1)]); err != nil {
		return fmt.Errorf("random source: %v", err)
	}
	h := newHash()
	sc.keepHash(h)
	defer secret.ScrubHash(h)
	d := make([]byte, n)
	tmp := make([]byte, 0, n+h.Size())
	sc.keepBuf(d)
	sc.keepBuf(tmp[:cap(tmp)])
	defer clear(d)
	defer clear(tmp[:cap(tmp)])
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, dst[i*n:(i+1)*n])
		tmp = diffuse(h, d, tmp[:0])
		copy(d, tmp)
	}
	subtle.XORBytes(dst[(stripes-1)*n:], d, key)
	return nil
}

// encryptArea encrypts a keyslot area in place, the inverse of
// decryptArea (only the cipher Format writes).
func encryptArea(enc string, key, buf []byte) error {
	if enc != FormatCipher || !areaKeySizeOK(enc, len(key)) || len(buf)%512 != 0 {
		return fmt.Errorf("area cipher %s with a %d-byte key over %d bytes", enc, len(key), len(buf))
	}
	var keys secret.AESKeys // the expanded keys are as secret as key
	defer keys.Wipe()
	c, err := xts.NewCipher(keys.New, key)
	if err != nil {
		return err
	}
	for i := 0; i < len(buf)/512; i++ {
		s := buf[i*512 : (i+1)*512]
		c.Encrypt(s, s, uint64(i))
	}
	return nil
}

// encodeCopy is one header copy at off: bin's label, UUID, salt and
// subsystem, the given magic, offsets and sequence id, meta as JSON, the
// checksum over all of it.
func encodeCopy(bin, js []byte, hdrSize, off int64, seqid uint64) ([]byte, error) {
	if int64(len(js)) >= hdrSize-luks2BinSize {
		return nil, fmt.Errorf("JSON metadata of %d bytes does not fit a %d-byte header", len(js), hdrSize)
	}
	b := make([]byte, hdrSize)
	copy(b, bin[:luks2BinSize])
	magic := luksMagic
	if off != 0 {
		magic = luksMagic2
	}
	copy(b, magic)
	binary.BigEndian.PutUint16(b[6:], 2)
	binary.BigEndian.PutUint64(b[8:], uint64(hdrSize))
	binary.BigEndian.PutUint64(b[16:], seqid)
	clear(b[0x48 : 0x48+32])
	copy(b[0x48:], fmtHash)
	binary.BigEndian.PutUint64(b[0x100:], uint64(off))
	clear(b[0x1c0 : 0x1c0+64])
	copy(b[luks2BinSize:], js)
	sum := sha256.Sum256(b)
	copy(b[0x1c0:], sum[:])
	return b, nil
}

// commit writes meta as header seqid, both copies, the secondary first
// (its JSON area, then its binary header), each write synced, and reads
// back what the device now holds, which must be that header.
func commit(ctx context.Context, dev Device, bin []byte, meta jobj, hdrSize int64, seqid uint64) (*Header, error) {
	js, err := json.Marshal(meta)
	if err != nil {
		return nil, fmt.Errorf("encode metadata: %v", err)
	}
	// What we are about to write must pass our own checks first.
	if err := checkStructure(js, hdrSize); err != nil {
		return nil, fmt.Errorf("new metadata: %w", err)
	}
	sec, err := encodeCopy(bin, js, hdrSize, hdrSize, seqid)
	if err != nil {
		return nil, err
	}
	pri, err := encodeCopy(bin, js, hdrSize, 0, seqid)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := writeSync(dev, sec[luks2BinSize:], hdrSize+luks2BinSize, "secondary header JSON area"); err != nil {
		return nil, err
	}
	if err := writeSync(dev, sec[:luks2BinSize], hdrSize, "secondary binary header"); err != nil {
		return nil, err
	}
	if err := writeSync(dev, pri, 0, "primary header"); err != nil {
		return nil, err
	}
	h, err := ReadHeader(dev)
	if err != nil {
		return nil, fmt.Errorf("read back: %w", err)
	}
	if h.SeqID != seqid || h.Secondary || !bytes.Equal(h.meta, js) {
		return nil, fmt.Errorf("read back: the device holds header %d, not the %d just written", h.SeqID, seqid)
	}
	return h, nil
}

// current checks that dev still holds h (the caller validated h; what is
// updated must be what was validated) and returns h's JSON as an object.
func current(dev Device, h *Header) (jobj, error) {
	if h == nil || h.meta == nil || h.bin == nil {
		return nil, errors.New("header was not read from a device (use ReadHeader)")
	}
	cur, err := ReadHeader(dev)
	if err != nil {
		return nil, fmt.Errorf("re-read header: %w", err)
	}
	if cur.SeqID != h.SeqID || !bytes.Equal(cur.meta, h.meta) || cur.UUID != h.UUID {
		return nil, fmt.Errorf("header changed since it was read (sequence id %d, now %d)", h.SeqID, cur.SeqID)
	}
	return decodeMeta(h.meta)
}

func decodeMeta(js []byte) (jobj, error) {
	d := json.NewDecoder(bytes.NewReader(js))
	d.UseNumber()
	var m jobj
	if err := d.Decode(&m); err != nil {
		return nil, fmt.Errorf("JSON metadata: %v", err)
	}
	return m, nil
}

// segmentDigest returns the digest that covers segment 0.
func (h *Header) segmentDigest() (*Digest, error) {
	for i := range h.Digests {
		if slices.Contains(h.Digests[i].Segments, 0) {
			return &h.Digests[i], nil
		}
	}
	return nil, errors.New("no digest covers the data segment")
}

// checkVolumeKey reports whether vk is the key h's digest verifies.
func checkVolumeKey(ctx context.Context, h *Header, vk *secret.Buf, sc *scratch) (*Digest, error) {
	d, err := h.segmentDigest()
	if err != nil {
		return nil, err
	}
	nh := hashFunc(d.Hash)
	if d.Type != "pbkdf2" || nh == nil {
		return nil, fmt.Errorf("digest %d: type %s hash %s", d.ID, d.Type, d.Hash)
	}
	got, err := pbkdf2Key(ctx, nh, vk.Bytes(), d.Salt, d.Iterations, len(d.Digest), sc)
	if err != nil {
		return nil, fmt.Errorf("digest %d: %w", d.ID, err)
	}
	ok := subtle.ConstantTimeCompare(got.Bytes(), d.Digest) == 1
	got.Wipe()
	if !ok {
		return nil, errors.New("the volume key does not match the header's digest")
	}
	return d, nil
}

// maxProbeIterations bounds the keyslots AddKeyslot tries the new
// passphrase on (to find that an interrupted run already added it): our
// own slots are minimal, and trying a benchmarked or argon2 slot would
// cost seconds for nothing.
const maxProbeIterations = 1 << 16

// AddKeyslot adds a keyslot for passphrase holding volumeKey (which must
// match the header's digest), minimal PBKDF2, in the lowest free id and
// the first free area (as cryptsetup places them); it returns the new
// slot id and the header as written. h must be what ReadHeader returned
// for dev, still on it.
//
// Writes: the new area (synced), then the header update. Run again after
// an interruption, it finds a keyslot the passphrase already opens and
// only makes both header copies agree.
func AddKeyslot(ctx context.Context, dev Device, h *Header, volumeKey, passphrase *secret.Buf, rand io.Reader) (int, *Header, error) {
	return addKeyslot(ctx, dev, h, volumeKey, passphrase, rand, nil)
}

func addKeyslot(ctx context.Context, dev Device, h *Header, volumeKey, passphrase *secret.Buf, rand io.Reader, sc *scratch) (int, *Header, error) {
	meta, err := current(dev, h)
	if err != nil {
		return 0, nil, fmt.Errorf("add keyslot: %w", err)
	}
	if passphrase.Len() == 0 {
		return 0, nil, errors.New("add keyslot: empty passphrase")
	}
	d, err := checkVolumeKey(ctx, h, volumeKey, sc)
	if err != nil {
		return 0, nil, fmt.Errorf("add keyslot: %w", err)
	}
	for _, k := range h.Keyslots {
		if k.Unbound || k.Priority == 0 || k.KDF.Type != "pbkdf2" || k.KDF.Iterations > maxProbeIterations {
			continue
		}
		vk, err := unseal(ctx, dev, h, k.ID, passphrase, sc)
		if err != nil {
			continue
		}
		same := subtle.ConstantTimeCompare(vk.Bytes(), volumeKey.Bytes()) == 1
		vk.Wipe()
		if same {
			nh, err := repair(ctx, dev, h, meta)
			if err != nil {
				return 0, nil, fmt.Errorf("add keyslot: %w", err)
			}
			return k.ID, nh, nil
		}
	}
	id := 0
	for ; id < maxIDs; id++ {
		if _, used := meta["keyslots"].(jobj)[strconv.Itoa(id)]; !used {
			break
		}
	}
	if id == maxIDs {
		return 0, nil, fmt.Errorf("add keyslot: all %d keyslots are in use", maxIDs)
	}
	a, err := freeArea(h, areaSize(volumeKey.Len()))
	if err != nil {
		return 0, nil, fmt.Errorf("add keyslot: %w", err)
	}
	a.Type, a.Encryption, a.KeySize = "raw", FormatCipher, VolumeKeyBytes
	ks, area, err := sealKeyslot(ctx, volumeKey, passphrase, a, randOr(rand), sc)
	if err != nil {
		return 0, nil, fmt.Errorf("add keyslot: %w", err)
	}
	defer clear(area)
	if err := writeSync(dev, area, a.Offset, fmt.Sprintf("keyslot %d area", id)); err != nil {
		return 0, nil, fmt.Errorf("add keyslot: %w", err)
	}
	meta["keyslots"].(jobj)[strconv.Itoa(id)] = ks
	dj := meta["digests"].(jobj)[strconv.Itoa(d.ID)].(jobj)
	dj["keyslots"] = append(dj["keyslots"].([]any), strconv.Itoa(id))
	nh, err := commit(ctx, dev, h.bin, meta, h.Size, h.SeqID+1)
	if err != nil {
		return 0, nil, fmt.Errorf("add keyslot %d: %w", id, err)
	}
	return id, nh, nil
}

// repair rewrites h unchanged (sequence id + 1) when its primary copy was
// damaged or stale, so both copies agree again; otherwise it returns h.
func repair(ctx context.Context, dev Device, h *Header, meta jobj) (*Header, error) {
	if h.PrimaryErr == nil && !h.Secondary {
		return h, nil
	}
	return commit(ctx, dev, h.bin, meta, h.Size, h.SeqID+1)
}

// keyslotAreas returns the bounds of the keyslots area (after both header
// copies) and the areas its keyslots use, by offset: what finding a gap
// and wiping the gaps both walk.
func keyslotAreas(h *Header) (start, end int64, used []Area) {
	start, end = 2*h.Size, 2*h.Size+h.KeyslotsSize
	used = make([]Area, 0, len(h.Keyslots))
	for _, k := range h.Keyslots {
		used = append(used, k.Area)
	}
	slices.SortFunc(used, func(a, b Area) int { return cmp.Compare(a.Offset, b.Offset) })
	return start, end, used
}

// freeArea is the first gap of n bytes in the keyslots area, searched from
// its start as cryptsetup does (LUKS2_find_area_gap).
func freeArea(h *Header, n int64) (Area, error) {
	start, end, used := keyslotAreas(h)
	off := start
	for _, u := range used {
		if off+n <= u.Offset {
			break
		}
		off = max(off, u.Offset+u.Size)
	}
	if off+n > end {
		return Area{}, fmt.Errorf("no free %d bytes in the keyslots area (%d..%d)", n, start, end)
	}
	return Area{Offset: off, Size: n}, nil
}

// RemoveKeyslot removes keyslot id from the metadata (and from every
// digest and token that names it), then wipes its key material area with
// random bytes. It refuses to remove the last usable keyslot. h must be
// what ReadHeader returned for dev, still on it.
//
// Run again after an interruption (the id is gone from the header), it
// makes both header copies agree and wipes every byte of the keyslots
// area that no keyslot uses, which covers the area the interrupted run
// may not have finished wiping.
func RemoveKeyslot(ctx context.Context, dev Device, h *Header, id int, rand io.Reader) (*Header, error) {
	meta, err := current(dev, h)
	if err != nil {
		return nil, fmt.Errorf("remove keyslot %d: %w", id, err)
	}
	rnd := randOr(rand)
	k, ok := h.Keyslot(id)
	if !ok {
		nh, err := repair(ctx, dev, h, meta)
		if err != nil {
			return nil, fmt.Errorf("remove keyslot %d: %w", id, err)
		}
		if err := wipeFree(dev, nh, rnd); err != nil {
			return nil, fmt.Errorf("remove keyslot %d (already gone): %w", id, err)
		}
		return nh, nil
	}
	usable := 0
	for _, o := range h.Keyslots {
		if o.ID != id && !o.Unbound && o.Priority > 0 {
			usable++
		}
	}
	if usable == 0 {
		return nil, fmt.Errorf("remove keyslot %d: it is the last usable keyslot", id)
	}
	sid := strconv.Itoa(id)
	delete(meta["keyslots"].(jobj), sid)
	for _, sec := range []string{"digests", "tokens"} {
		for _, v := range meta[sec].(jobj) {
			o := v.(jobj)
			if l, ok := o["keyslots"].([]any); ok {
				o["keyslots"] = slices.DeleteFunc(l, func(x any) bool { return x == sid })
			}
		}
	}
	nh, err := commit(ctx, dev, h.bin, meta, h.Size, h.SeqID+1)
	if err != nil {
		return nil, fmt.Errorf("remove keyslot %d: %w", id, err)
	}
	if err := wipeRange(dev, k.Area.Offset, k.Area.Size, rnd); err != nil {
		return nil, fmt.Errorf("remove keyslot %d: removed from the header, but %w", id, err)
	}
	return nh, nil
}

// wipeRange overwrites n bytes at off with random bytes and syncs.
func wipeRange(dev Device, off, n int64, rnd io.Reader) error {
	b, err := randBytes(rnd, int(n))
	if err != nil {
		return err
	}
	return writeSync(dev, b, off, "keyslot area wipe")
}

// wipeFree wipes every gap of the keyslots area that no keyslot uses.
func wipeFree(dev Device, h *Header, rnd io.Reader) error {
	start, end, used := keyslotAreas(h)
	off := start
	for _, u := range append(used, Area{Offset: end}) {
		if u.Offset > off {
			if err := wipeRange(dev, off, u.Offset-off, rnd); err != nil {
				return err
			}
		}
		off = max(off, u.Offset+u.Size)
	}
	return nil
}
