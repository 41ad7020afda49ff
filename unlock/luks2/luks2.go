package luks2

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Header is a parsed, checksummed LUKS2 header: everything the validator
// checks and everything the unlocker uses. Unlocking works from this value
// only, never from a second parse of the device, so what was validated is
// what gets mapped.
type Header struct {
	Version int
	UUID    string
	Label   string
	Size    int64 // binary header + JSON area of one copy
	SeqID   uint64
	// Secondary is true when the primary copy was damaged, or is older
	// than the secondary (an interrupted update), and this is the
	// secondary; PrimaryErr then says what was wrong with the primary.
	Secondary  bool
	PrimaryErr error
	Segments   []Segment
	Keyslots   []Keyslot
	Digests    []Digest
	// Flags are the persistent activation flags stored in the header.
	// They are reported, never applied: an attacker can write them.
	Flags []string
	// Requirements are config.requirements.mandatory (e.g. an unfinished
	// reencryption); any is a refusal.
	Requirements []string
	KeyslotsSize int64

	// bin and meta are the binary header and the JSON text of the copy
	// this value was read from (or written as): the writers (write.go)
	// edit that JSON, so fields we do not model (tokens, flags, priorities)
	// survive an update exactly as cryptsetup keeps them.
	bin  []byte
	meta []byte
}

// Segment is one LUKS2 data segment.
type Segment struct {
	ID         int
	Type       string
	Offset     int64
	Size       string // "dynamic" or decimal bytes
	IVTweak    uint64
	Encryption string
	SectorSize int
	// Integrity is set when the segment asks for dm-integrity, which we
	// don't set up: mapping it as plain dm-crypt would be wrong.
	Integrity bool
}

// SizeBytes is the segment length on a device of devSize bytes.
func (s Segment) SizeBytes(devSize int64) (int64, error) {
	if s.Size == "dynamic" {
		if devSize <= s.Offset {
			return 0, fmt.Errorf("device of %d bytes ends before segment %d at %d", devSize, s.ID, s.Offset)
		}
		return (devSize - s.Offset) / int64(s.SectorSize) * int64(s.SectorSize), nil
	}
	n, err := strconv.ParseInt(s.Size, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("segment %d size %q", s.ID, s.Size)
	}
	// Compared without adding: Offset+n can overflow.
	if s.Offset > devSize || n > devSize-s.Offset {
		return 0, fmt.Errorf("segment %d (%d bytes at %d) is beyond the end of the %d-byte device", s.ID, n, s.Offset, devSize)
	}
	return n, nil
}

// Keyslot is one LUKS2 keyslot.
type Keyslot struct {
	ID       int
	Type     string
	KeySize  int // volume key size in bytes
	Priority int // 0 ignore, 1 normal, 2 high
	KDF      KDF
	AF       AF
	Area     Area
	// AreaEnc is Area.Encryption (kept for existing callers).
	AreaEnc string
	// Unbound is set when the keyslot's digest covers no data segment
	// (`cryptsetup luksAddKey --unbound`): its key opens nothing, so it is
	// never tried (SlotOrder leaves it out).
	Unbound bool
}

// KDF turns a passphrase into the key of a keyslot area.
type KDF struct {
	Type       string // pbkdf2, argon2i, argon2id
	Hash       string // pbkdf2
	Iterations int    // pbkdf2
	Time       int    // argon2 passes
	Memory     int    // argon2, KiB
	CPUs       int    // argon2 lanes
	Salt       []byte
}

// AF is the anti-forensic splitter of a keyslot.
type AF struct {
	Type    string
	Stripes int
	Hash    string
}

// Area is where a keyslot's split, encrypted key material lives.
type Area struct {
	Type       string
	Encryption string
	KeySize    int
	Offset     int64
	Size       int64
}

// Digest verifies a candidate volume key.
type Digest struct {
	ID         int
	Type       string
	Keyslots   []int
	Segments   []int
	Hash       string
	Iterations int
	Salt       []byte
	Digest     []byte
}

// Policy is what a header must satisfy before any key is tried (DESIGN §6).
// LUKS2 metadata is not authenticated: an attacker who can write the disk
// can rewrite it to, say, cipher_null and fix the checksum, and the OS
// would then write plaintext. So the header is checked against what we
// expect, not trusted.
type Policy struct {
	// Ciphers allowed for data segments (the kernel does this work).
	Ciphers []string
	// KeyslotCiphers allowed for keyslot areas (we decrypt those
	// ourselves, so only what keyslot.go implements).
	KeyslotCiphers []string
	// MinKeyBits is the smallest volume key accepted.
	MinKeyBits int
	// UUID, when set, must equal the header's UUID.
	UUID string
	// MaxKDFMemoryKiB bounds argon2 memory; 0 means cryptsetup's own
	// maximum (4 GiB). A header asking for more is refused instead of
	// taking PID 1 down with an out-of-memory kill.
	MaxKDFMemoryKiB int
}

// DefaultCiphers are real ciphers with a tweakable or IV'd mode.
var DefaultCiphers = []string{
	"aes-xts-plain64", "aes-xts-plain", "aes-xts-essiv:sha256",
	"aes-cbc-essiv:sha256", "aes-adiantum-plain64",
	"serpent-xts-plain64", "twofish-xts-plain64", "camellia-xts-plain64",
	"xchacha20,aes-adiantum-plain64", "xchacha12,aes-adiantum-plain64",
}

// DefaultKeyslotCiphers are the keyslot-area ciphers keyslot.go decrypts.
// cryptsetup uses aes-xts-plain64 unless told otherwise.
var DefaultKeyslotCiphers = []string{"aes-xts-plain64", "aes-xts-plain", "aes-cbc-essiv:sha256"}

// DefaultPolicy is used when the configuration says nothing more.
func DefaultPolicy() Policy {
	return Policy{Ciphers: DefaultCiphers, KeyslotCiphers: DefaultKeyslotCiphers, MinKeyBits: 256}
}

// ErrRefused is wrapped by every validation refusal.
var ErrRefused = errors.New("LUKS header refused")

const (
	luks2BinSize = 4096
	maxHdrSize   = 4 << 20
	// afStripes is the only stripe count cryptsetup writes or accepts.
	afStripes = 4000
	// maxArgonMemKiB, maxArgonCPUs and the time bound are cryptsetup's
	// own limits for argon2 keyslots.
	maxArgonMemKiB = 4 << 20
	maxArgonCPUs   = 16
	maxArgonTime   = 1 << 20
)

// validHeaderSizes are the LUKS2 header sizes cryptsetup may write; the
// secondary header sits right after the primary, at one of these offsets.
var validHeaderSizes = []int64{16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20}

// ReadHeader reads and checksums the primary LUKS2 header; if the primary is
// damaged it looks for an intact secondary, marks the result and records
// why the primary was not used.
//
// Which secondary is looked at follows cryptsetup (LUKS2_disk_hdr_read):
// when the primary's binary header and checksum are sound and only its
// metadata is bad, its hdr_size says where the secondary is; only when the
// primary is unreadable are all possible offsets tried. A primary with the
// LUKS magic and another version is not LUKS2 at all.
func ReadHeader(r io.ReaderAt) (*Header, error) {
	h, sealed, perr := readHeaderAt(r, 0)
	if perr == nil {
		// Both copies intact: the higher sequence id wins, as in
		// cryptsetup. A header update writes the secondary first, so a
		// power cut between the two writes leaves a newer secondary
		// beside an older primary, and the update counts from then on.
		if h2, _, err := readHeaderAt(r, h.Size); err == nil && h2.SeqID > h.SeqID {
			h2.Secondary = true
			h2.PrimaryErr = fmt.Errorf("primary copy is stale (sequence id %d, secondary %d): an interrupted header update", h.SeqID, h2.SeqID)
			return h2, nil
		}
		return h, nil
	}
	if errors.Is(perr, errVersion) {
		return nil, perr
	}
	offs := validHeaderSizes
	if sealed > 0 {
		offs = []int64{sealed}
	}
	var serr error // why the secondary was not used, when it was there
	for _, off := range offs {
		h, _, err := readHeaderAt(r, off)
		if err == nil && h.Size == off {
			h.Secondary = true
			h.PrimaryErr = perr
			return h, nil
		}
		if err == nil {
			err = fmt.Errorf("%w: secondary header at %d has size %d", ErrRefused, off, h.Size)
		}
		if serr == nil && !errors.Is(err, errNoMagic) {
			serr = err
		}
	}
	if serr != nil {
		return nil, fmt.Errorf("%w; secondary copy: %v", perr, serr)
	}
	return nil, fmt.Errorf("%w (no intact secondary copy either)", perr)
}

// errNoMagic marks a copy that is not there at all.
var errNoMagic = errors.New("no LUKS magic")

// errVersion marks a LUKS magic with a version other than 2.
var errVersion = errors.New("not LUKS version 2")

// readHeaderAt reads the copy at off. sealed is its hdr_size when the
// binary header and checksum verified (whatever is wrong is in the JSON).
func readHeaderAt(r io.ReaderAt, off int64) (h *Header, sealed int64, err error) {
	bin := make([]byte, luks2BinSize)
	if _, err := r.ReadAt(bin, off); err != nil {
		return nil, 0, fmt.Errorf("%w: read header at %d: %v", ErrRefused, off, err)
	}
	wantMagic := luksMagic
	if off != 0 {
		wantMagic = luksMagic2
	}
	if !bytes.Equal(bin[:6], wantMagic) {
		return nil, 0, fmt.Errorf("%w: %w at offset %d", ErrRefused, errNoMagic, off)
	}
	ver := int(binary.BigEndian.Uint16(bin[6:8]))
	if ver != 2 {
		// Version 0 is a damaged copy; any other is another format.
		if ver == 0 {
			return nil, 0, fmt.Errorf("%w: LUKS version 0 at offset %d", ErrRefused, off)
		}
		return nil, 0, fmt.Errorf("%w: %w: LUKS version %d at offset %d", ErrRefused, errVersion, ver, off)
	}
	size := int64(binary.BigEndian.Uint64(bin[8:16]))
	if size < 16<<10 || size > maxHdrSize {
		return nil, 0, fmt.Errorf("%w: implausible header size %d", ErrRefused, size)
	}
	if hdrOff := int64(binary.BigEndian.Uint64(bin[0x100:0x108])); hdrOff != off {
		return nil, 0, fmt.Errorf("%w: header at %d claims offset %d", ErrRefused, off, hdrOff)
	}
	if algo := cstr(bin[0x48 : 0x48+32]); algo != "sha256" {
		return nil, 0, fmt.Errorf("%w: unsupported header checksum %q", ErrRefused, algo)
	}
	all := make([]byte, size)
	if _, err := r.ReadAt(all, off); err != nil {
		return nil, 0, fmt.Errorf("%w: read header at %d: %v", ErrRefused, off, err)
	}
	want := append([]byte(nil), all[0x1c0:0x1c0+32]...)
	clear(all[0x1c0 : 0x1c0+64])
	if got := sha256.Sum256(all); !bytes.Equal(got[:], want) {
		return nil, 0, fmt.Errorf("%w: header checksum mismatch at offset %d", ErrRefused, off)
	}
	sealed = size
	if size&(size-1) != 0 {
		return nil, sealed, fmt.Errorf("%w: header size %d at %d is not a power of two", ErrRefused, size, off)
	}
	js, err := jsonText(all[luks2BinSize:], off)
	if err != nil {
		return nil, sealed, err
	}
	if err := checkStructure(js, size); err != nil {
		return nil, sealed, fmt.Errorf("%w (header at %d)", err, off)
	}
	h, err = parseJSON(js)
	if err != nil {
		return nil, sealed, err
	}
	h.Version = ver
	h.Size = size
	h.bin = all[:luks2BinSize:luks2BinSize]
	h.meta = js
	h.SeqID = binary.BigEndian.Uint64(bin[16:24])
	h.UUID = cstr(bin[0xa8 : 0xa8+40])
	h.Label = cstr(bin[0x18 : 0x18+48])
	return h, size, nil
}

// The JSON is decoded into exact types: a number where a string is due
// (or the reverse) is a refusal, not a guess.
type jsonMeta struct {
	Keyslots map[string]struct {
		Type     string `json:"type"`
		KeySize  int    `json:"key_size"`
		Priority *int   `json:"priority"`
		KDF      struct {
			Type       string `json:"type"`
			Hash       string `json:"hash"`
			Iterations int    `json:"iterations"`
			Time       int    `json:"time"`
			Memory     int    `json:"memory"`
			CPUs       int    `json:"cpus"`
			Salt       string `json:"salt"`
		} `json:"kdf"`
		AF struct {
			Type    string `json:"type"`
			Stripes int    `json:"stripes"`
			Hash    string `json:"hash"`
		} `json:"af"`
		Area struct {
			Type       string `json:"type"`
			Encryption string `json:"encryption"`
			KeySize    int    `json:"key_size"`
			Offset     string `json:"offset"`
			Size       string `json:"size"`
		} `json:"area"`
	} `json:"keyslots"`
	Segments map[string]struct {
		Type       string          `json:"type"`
		Offset     string          `json:"offset"`
		Size       string          `json:"size"`
		IVTweak    string          `json:"iv_tweak"`
		Encryption string          `json:"encryption"`
		SectorSize int             `json:"sector_size"`
		Integrity  json.RawMessage `json:"integrity"`
	} `json:"segments"`
	Digests map[string]struct {
		Type       string   `json:"type"`
		Keyslots   []string `json:"keyslots"`
		Segments   []string `json:"segments"`
		Hash       string   `json:"hash"`
		Iterations int      `json:"iterations"`
		Salt       string   `json:"salt"`
		Digest     string   `json:"digest"`
	} `json:"digests"`
	Config struct {
		KeyslotsSize string   `json:"keyslots_size"`
		Flags        []string `json:"flags"`
		Requirements struct {
			Mandatory []string `json:"mandatory"`
		} `json:"requirements"`
	} `json:"config"`
}

func parseID(what, k string) (int, error) {
	id, err := strconv.Atoi(k)
	if err != nil || id < 0 || id >= maxIDs || strconv.Itoa(id) != k {
		return 0, fmt.Errorf("%w: %s id %q", ErrRefused, what, k)
	}
	return id, nil
}

func parseU64(what, s string) (int64, error) {
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%w: %s %q is not a byte count", ErrRefused, what, s)
	}
	return v, nil
}

func parseB64(what, s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not base64", ErrRefused, what)
	}
	return b, nil
}

func parseJSON(js []byte) (*Header, error) {
	var m jsonMeta
	if err := json.Unmarshal(js, &m); err != nil {
		return nil, fmt.Errorf("%w: JSON metadata: %v", ErrRefused, err)
	}
	h := &Header{Flags: m.Config.Flags, Requirements: m.Config.Requirements.Mandatory}
	if m.Config.KeyslotsSize != "" {
		v, err := parseU64("keyslots_size", m.Config.KeyslotsSize)
		if err != nil {
			return nil, err
		}
		h.KeyslotsSize = v
	}
	for k, s := range m.Segments {
		id, err := parseID("segment", k)
		if err != nil {
			return nil, err
		}
		seg := Segment{ID: id, Type: s.Type, Size: s.Size, Encryption: s.Encryption, SectorSize: s.SectorSize,
			Integrity: len(s.Integrity) > 0 && string(s.Integrity) != "null"}
		if seg.Offset, err = parseU64(fmt.Sprintf("segment %d offset", id), s.Offset); err != nil {
			return nil, err
		}
		if s.IVTweak != "" {
			t, err := strconv.ParseUint(s.IVTweak, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("%w: segment %d iv_tweak %q", ErrRefused, id, s.IVTweak)
			}
			seg.IVTweak = t
		}
		h.Segments = append(h.Segments, seg)
	}
	for k, ks := range m.Keyslots {
		id, err := parseID("keyslot", k)
		if err != nil {
			return nil, err
		}
		prio := 1
		if ks.Priority != nil {
			prio = *ks.Priority
		}
		s := Keyslot{ID: id, Type: ks.Type, KeySize: ks.KeySize, Priority: prio,
			KDF: KDF{Type: ks.KDF.Type, Hash: ks.KDF.Hash, Iterations: ks.KDF.Iterations,
				Time: ks.KDF.Time, Memory: ks.KDF.Memory, CPUs: ks.KDF.CPUs},
			AF:      AF{Type: ks.AF.Type, Stripes: ks.AF.Stripes, Hash: ks.AF.Hash},
			Area:    Area{Type: ks.Area.Type, Encryption: ks.Area.Encryption, KeySize: ks.Area.KeySize},
			AreaEnc: ks.Area.Encryption,
		}
		if s.KDF.Salt, err = parseB64(fmt.Sprintf("keyslot %d salt", id), ks.KDF.Salt); err != nil {
			return nil, err
		}
		if s.Area.Offset, err = parseU64(fmt.Sprintf("keyslot %d area offset", id), ks.Area.Offset); err != nil {
			return nil, err
		}
		if s.Area.Size, err = parseU64(fmt.Sprintf("keyslot %d area size", id), ks.Area.Size); err != nil {
			return nil, err
		}
		h.Keyslots = append(h.Keyslots, s)
	}
	for k, d := range m.Digests {
		id, err := parseID("digest", k)
		if err != nil {
			return nil, err
		}
		dg := Digest{ID: id, Type: d.Type, Hash: d.Hash, Iterations: d.Iterations}
		for _, s := range d.Keyslots {
			v, err := parseID(fmt.Sprintf("digest %d keyslot", id), s)
			if err != nil {
				return nil, err
			}
			dg.Keyslots = append(dg.Keyslots, v)
		}
		for _, s := range d.Segments {
			v, err := parseID(fmt.Sprintf("digest %d segment", id), s)
			if err != nil {
				return nil, err
			}
			dg.Segments = append(dg.Segments, v)
		}
		if dg.Salt, err = parseB64(fmt.Sprintf("digest %d salt", id), d.Salt); err != nil {
			return nil, err
		}
		if dg.Digest, err = parseB64(fmt.Sprintf("digest %d digest", id), d.Digest); err != nil {
			return nil, err
		}
		h.Digests = append(h.Digests, dg)
	}
	for i := range h.Keyslots {
		d := h.digestFor(h.Keyslots[i].ID)
		h.Keyslots[i].Unbound = d == nil || len(d.Segments) == 0
	}
	slices.SortFunc(h.Segments, func(a, b Segment) int { return a.ID - b.ID })
	slices.SortFunc(h.Keyslots, func(a, b Keyslot) int { return a.ID - b.ID })
	slices.SortFunc(h.Digests, func(a, b Digest) int { return a.ID - b.ID })
	return h, nil
}

// Validate applies p to h. The error says exactly what was refused.
func (p Policy) Validate(h *Header) error {
	if h.Version != 2 {
		return fmt.Errorf("%w: LUKS version %d", ErrRefused, h.Version)
	}
	if p.UUID != "" && !strings.EqualFold(p.UUID, h.UUID) {
		return fmt.Errorf("%w: UUID is %s, configured %s", ErrRefused, h.UUID, p.UUID)
	}
	if len(h.Requirements) > 0 {
		return fmt.Errorf("%w: header requires %s (e.g. an unfinished reencryption), which is not supported", ErrRefused, strings.Join(h.Requirements, ", "))
	}
	if len(h.Segments) == 0 {
		return fmt.Errorf("%w: no data segment", ErrRefused)
	}
	metaEnd := 2 * h.Size
	for _, s := range h.Segments {
		if s.Type != "crypt" {
			return fmt.Errorf("%w: segment %d has type %q, only \"crypt\" is allowed", ErrRefused, s.ID, s.Type)
		}
		if !allowed(p.Ciphers, s.Encryption) {
			return fmt.Errorf("%w: segment %d cipher %q is not on the allow-list", ErrRefused, s.ID, s.Encryption)
		}
		if s.Integrity {
			return fmt.Errorf("%w: segment %d asks for dm-integrity, which is not supported", ErrRefused, s.ID)
		}
		if s.SectorSize != 512 && s.SectorSize != 1024 && s.SectorSize != 2048 && s.SectorSize != 4096 {
			return fmt.Errorf("%w: segment %d sector size %d", ErrRefused, s.ID, s.SectorSize)
		}
		if s.Offset < metaEnd || s.Offset%int64(s.SectorSize) != 0 {
			return fmt.Errorf("%w: segment %d offset %d overlaps the metadata or is not sector aligned", ErrRefused, s.ID, s.Offset)
		}
		if s.Size != "dynamic" {
			n, err := strconv.ParseInt(s.Size, 10, 64)
			if err != nil || n <= 0 || n%int64(s.SectorSize) != 0 {
				return fmt.Errorf("%w: segment %d size %q", ErrRefused, s.ID, s.Size)
			}
		}
	}
	if len(h.Segments) != 1 || h.Segments[0].ID != 0 {
		return fmt.Errorf("%w: %d data segments, exactly one (segment 0) is supported", ErrRefused, len(h.Segments))
	}
	seg := h.Segments[0]
	for _, d := range h.Digests {
		if d.Type != "pbkdf2" {
			return fmt.Errorf("%w: digest %d type %q, only pbkdf2 is supported", ErrRefused, d.ID, d.Type)
		}
		if hashFunc(d.Hash) == nil {
			return fmt.Errorf("%w: digest %d hash %q", ErrRefused, d.ID, d.Hash)
		}
		if d.Iterations < 1 || d.Iterations > maxDigestIterations || len(d.Digest) < 16 || len(d.Salt) == 0 {
			return fmt.Errorf("%w: digest %d: %d iterations (at most %d), %d-byte digest", ErrRefused, d.ID, d.Iterations, maxDigestIterations, len(d.Digest))
		}
	}
	usable := 0
	for _, k := range h.Keyslots {
		// An unbound keyslot is never tried, so our policy does not
		// apply to it (the structure was checked when reading).
		if k.Unbound {
			continue
		}
		if err := p.validateKeyslot(h, k, seg); err != nil {
			return err
		}
		if k.Priority > 0 {
			usable++
		}
	}
	if usable == 0 {
		return fmt.Errorf("%w: no usable keyslot", ErrRefused)
	}
	return nil
}

func (p Policy) validateKeyslot(h *Header, k Keyslot, seg Segment) error {
	ref := func(format string, a ...any) error {
		return fmt.Errorf("%w: keyslot %d %s", ErrRefused, k.ID, fmt.Sprintf(format, a...))
	}
	if k.Type != "luks2" {
		return ref("has type %q", k.Type)
	}
	if k.KeySize*8 < p.MinKeyBits {
		return ref("holds a %d-bit key, at least %d required", k.KeySize*8, p.MinKeyBits)
	}
	if k.KeySize > 512 {
		return ref("holds a %d-byte key", k.KeySize)
	}
	if k.Priority < 0 || k.Priority > 2 {
		return ref("priority %d", k.Priority)
	}
	if !allowed(p.Ciphers, k.Area.Encryption) {
		return ref("area cipher %q is not on the allow-list", k.Area.Encryption)
	}
	if !allowed(p.keyslotCiphers(), k.Area.Encryption) {
		return ref("area cipher %q is not supported for keyslots", k.Area.Encryption)
	}
	if k.Area.Type != "raw" {
		return ref("area type %q", k.Area.Type)
	}
	if !areaKeySizeOK(k.Area.Encryption, k.Area.KeySize) {
		return ref("area key of %d bytes for %s", k.Area.KeySize, k.Area.Encryption)
	}
	if k.AF.Type != "luks1" || k.AF.Stripes != afStripes || hashFunc(k.AF.Hash) == nil {
		return ref("anti-forensic splitter %s/%d/%s", k.AF.Type, k.AF.Stripes, k.AF.Hash)
	}
	// Compared without adding: Offset+Size can overflow.
	if k.Area.Offset < 2*h.Size || k.Area.Offset%512 != 0 || k.Area.Offset > seg.Offset ||
		k.Area.Size > seg.Offset-k.Area.Offset {
		return ref("area %d+%d lies outside the keyslots area (%d..%d)", k.Area.Offset, k.Area.Size, 2*h.Size, seg.Offset)
	}
	if need := int64(k.KeySize) * afStripes; k.Area.Size < need {
		return ref("area of %d bytes is too small for %d bytes of split key material", k.Area.Size, need)
	}
	switch k.KDF.Type {
	case "pbkdf2":
		if hashFunc(k.KDF.Hash) == nil || k.KDF.Iterations < 1 || k.KDF.Iterations > maxPBKDF2Iterations {
			return ref("pbkdf2 with hash %q, %d iterations (at most %d)", k.KDF.Hash, k.KDF.Iterations, maxPBKDF2Iterations)
		}
	case "argon2i", "argon2id":
		maxMem := p.MaxKDFMemoryKiB
		if maxMem == 0 {
			maxMem = maxArgonMemKiB
		}
		if k.KDF.Time < 1 || k.KDF.Time > maxArgonTime || k.KDF.CPUs < 1 || k.KDF.CPUs > maxArgonCPUs ||
			k.KDF.Memory < 8*k.KDF.CPUs || k.KDF.Memory > maxMem || k.KDF.Time > maxArgonCost/k.KDF.Memory {
			return ref("%s time %d, memory %d KiB, %d lanes is out of bounds (memory at most %d KiB, time × memory at most %d)", k.KDF.Type, k.KDF.Time, k.KDF.Memory, k.KDF.CPUs, maxMem, maxArgonCost)
		}
	default:
		return ref("KDF %q", k.KDF.Type)
	}
	if len(k.KDF.Salt) == 0 {
		return ref("has an empty KDF salt")
	}
	return nil
}

// digestFor returns the digest that verifies keys from keyslot id.
func (h *Header) digestFor(id int) *Digest {
	for i := range h.Digests {
		if slices.Contains(h.Digests[i].Keyslots, id) {
			return &h.Digests[i]
		}
	}
	return nil
}

// Keyslot returns keyslot id.
func (h *Header) Keyslot(id int) (Keyslot, bool) {
	for _, k := range h.Keyslots {
		if k.ID == id {
			return k, true
		}
	}
	return Keyslot{}, false
}

func (p Policy) keyslotCiphers() []string {
	if p.KeyslotCiphers == nil {
		return DefaultKeyslotCiphers
	}
	return p.KeyslotCiphers
}

func allowed(list []string, c string) bool {
	// cipher_null in any spelling is refused whatever the list says.
	if strings.Contains(strings.ToLower(c), "null") {
		return false
	}
	return slices.Contains(list, c)
}

// SlotOrder returns keyslot ids, high priority first, then normal, each
// group in ascending id order (priority 0 and unbound slots are never
// tried).
func (h *Header) SlotOrder() []int {
	var hi, norm []int
	for _, k := range h.Keyslots {
		if k.Unbound {
			continue
		}
		switch k.Priority {
		case 2:
			hi = append(hi, k.ID)
		case 1:
			norm = append(norm, k.ID)
		}
	}
	return append(hi, norm...)
}

// Structural rules, as cryptsetup's LUKS2_hdr_validate applies them: a
// header copy breaking any of them is not a LUKS2 header, so the reader
// falls back to the other copy exactly as cryptsetup does. The policy
// (Validate) comes on top.
const (
	// maxIDs is LUKS2_KEYSLOTS_MAX (and the token limit): ids are 0..31.
	maxIDs = 32
	// maxKeyslotsSize is LUKS2_MAX_KEYSLOTS_SIZE.
	maxKeyslotsSize = 128 << 20
	// KDF cost bounds. cryptsetup benchmarks costs to about 2 s on the
	// machine that formats; these bounds leave an order of magnitude of
	// room above that and still keep a rewritten header from stalling the
	// boot for hours (2^40 iterations would be days).
	maxPBKDF2Iterations = 1 << 25
	maxDigestIterations = 1 << 24
	// maxArgonCost bounds passes × memory (KiB): 4 passes of 4 GiB.
	maxArgonCost = 4 * maxArgonMemKiB
)

// jsonText returns the JSON text of a JSON area: it must open an object at
// the first byte, end with a NUL inside the area, and only NULs may follow.
func jsonText(area []byte, off int64) ([]byte, error) {
	i := bytes.IndexByte(area, 0)
	if i < 0 {
		return nil, fmt.Errorf("%w: JSON area at %d has no terminating NUL", ErrRefused, off)
	}
	if i == 0 || area[0] != '{' {
		return nil, fmt.Errorf("%w: JSON area at %d does not start with an object", ErrRefused, off)
	}
	for _, c := range area[i:] {
		if c != 0 {
			return nil, fmt.Errorf("%w: JSON area at %d has data after the terminating NUL", ErrRefused, off)
		}
	}
	return area[:i], nil
}

type jobj = map[string]any

// checkStructure checks the JSON metadata of a header of size bytes for
// everything cryptsetup checks: section types, id ranges, references
// between keyslots, digests, segments and tokens, keyslot areas and the
// config sizes. Errors name the field.
func checkStructure(js []byte, size int64) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, a...))
	}
	if err := noDuplicateKeys(js); err != nil {
		return bad("JSON metadata: %v", err)
	}
	d := json.NewDecoder(bytes.NewReader(js))
	d.UseNumber()
	var top jobj
	if err := d.Decode(&top); err != nil {
		return bad("JSON metadata: %v", err)
	}
	if d.More() {
		return bad("JSON metadata: more than one value")
	}
	sec := map[string]jobj{}
	for _, name := range []string{"keyslots", "tokens", "segments", "digests", "config"} {
		o, ok := top[name].(jobj)
		if !ok {
			return bad("JSON section %q is missing or not an object", name)
		}
		sec[name] = o
	}
	ids := func(what string, o jobj, limit int) (map[string]jobj, error) {
		out := map[string]jobj{}
		for k, v := range o {
			if _, err := parseIDLimit(k, limit); err != nil {
				return nil, bad("%s id %q", what, k)
			}
			m, ok := v.(jobj)
			if !ok {
				return nil, bad("%s %s is not an object", what, k)
			}
			if _, ok := m["type"].(string); !ok {
				return nil, bad("%s %s has no type string", what, k)
			}
			out[k] = m
		}
		return out, nil
	}
	keyslots, err := ids("keyslot", sec["keyslots"], maxIDs)
	if err != nil {
		return err
	}
	// cryptsetup does not bound token ids when validating.
	tokens, err := ids("token", sec["tokens"], math.MaxInt32)
	if err != nil {
		return err
	}
	segments, err := ids("segment", sec["segments"], maxIDs)
	if err != nil {
		return err
	}
	digests, err := ids("digest", sec["digests"], maxIDs)
	if err != nil {
		return err
	}
	// refs checks a list of ids naming entries of target.
	refs := func(what string, v any, target map[string]jobj) ([]string, error) {
		l, ok := v.([]any)
		if !ok {
			return nil, bad("%s is not an array", what)
		}
		var out []string
		for _, x := range l {
			s, ok := x.(string)
			if !ok {
				return nil, bad("%s holds a non-string", what)
			}
			if _, ok := target[s]; !ok {
				return nil, bad("%s names %q, which does not exist", what, s)
			}
			out = append(out, s)
		}
		return out, nil
	}
	strs := func(what string, v any) error {
		l, ok := v.([]any)
		if !ok {
			return bad("%s is not an array", what)
		}
		for _, x := range l {
			if _, ok := x.(string); !ok {
				return bad("%s holds a non-string", what)
			}
		}
		return nil
	}
	// Config.
	cfg := sec["config"]
	jsonSize, err := u64str("config.json_size", cfg["json_size"])
	if err != nil {
		return err
	}
	if jsonSize != uint64(size-luks2BinSize) {
		return bad("config.json_size %d does not match the header size %d", jsonSize, size)
	}
	ksSize, err := u64str("config.keyslots_size", cfg["keyslots_size"])
	if err != nil {
		return err
	}
	if ksSize%4096 != 0 || ksSize > maxKeyslotsSize {
		return bad("config.keyslots_size %d is not a multiple of 4096 up to %d", ksSize, maxKeyslotsSize)
	}
	if v, ok := cfg["flags"]; ok {
		if err := strs("config.flags", v); err != nil {
			return err
		}
	}
	if v, ok := cfg["requirements"]; ok {
		r, ok := v.(jobj)
		if !ok {
			return bad("config.requirements is not an object")
		}
		if m, ok := r["mandatory"]; ok {
			if err := strs("config.requirements.mandatory", m); err != nil {
				return err
			}
		}
	}
	// Segments: ids 0..n-1 without gaps.
	metaEnd := uint64(2 * size)
	var firstData uint64 = math.MaxUint64
	for i := range len(segments) {
		k := strconv.Itoa(i)
		s, ok := segments[k]
		if !ok {
			return bad("segment ids have a gap at %d", i)
		}
		off, err := u64str("segment "+k+" offset", s["offset"])
		if err != nil {
			return err
		}
		if off%512 != 0 {
			return bad("segment %s offset %d is not 512-byte aligned", k, off)
		}
		if sz, ok := s["size"].(string); !ok || sz != "dynamic" {
			n, err := u64str("segment "+k+" size", s["size"])
			if err != nil {
				return err
			}
			if n%512 != 0 {
				return bad("segment %s size %d is not 512-byte aligned", k, n)
			}
		}
		if v, ok := s["flags"]; ok {
			if err := strs("segment "+k+" flags", v); err != nil {
				return err
			}
		}
		if s["type"] == "crypt" {
			if _, err := u64str("segment "+k+" iv_tweak", s["iv_tweak"]); err != nil {
				return err
			}
			if _, ok := s["encryption"].(string); !ok {
				return bad("segment %s has no encryption string", k)
			}
			ss, err := jint("segment "+k+" sector_size", s["sector_size"])
			if err != nil {
				return err
			}
			if ss < 512 || ss > 4096 || ss&(ss-1) != 0 {
				return bad("segment %s sector size %d", k, ss)
			}
			if v, ok := s["integrity"]; ok {
				if _, ok := v.(jobj); !ok {
					return bad("segment %s integrity is not an object", k)
				}
			}
		}
		if off != 0 {
			firstData = min(firstData, off)
		}
	}
	if firstData != math.MaxUint64 && (firstData < metaEnd || ksSize > firstData-metaEnd) {
		return bad("metadata (%d bytes) and keyslots area (%d bytes) reach into the data segment at %d", metaEnd, ksSize, firstData)
	}
	// Keyslots: areas inside the keyslots area, pairwise disjoint.
	type span struct {
		id       string
		off, end uint64
	}
	var areas []span
	for k, ks := range keyslots {
		if _, err := jint("keyslot "+k+" key_size", ks["key_size"]); err != nil {
			return err
		}
		if v, ok := ks["priority"]; ok {
			if _, err := jint("keyslot "+k+" priority", v); err != nil {
				return err
			}
		}
		if ks["type"] != "luks2" {
			continue
		}
		for _, o := range []string{"kdf", "af", "area"} {
			if _, ok := ks[o].(jobj); !ok {
				return bad("keyslot %s %s is missing or not an object", k, o)
			}
		}
		kdf, af, area := ks["kdf"].(jobj), ks["af"].(jobj), ks["area"].(jobj)
		need := func(o jobj, where string, strFields, numFields []string) error {
			for _, f := range strFields {
				if _, ok := o[f].(string); !ok {
					return bad("keyslot %s %s.%s is missing or not a string", k, where, f)
				}
			}
			for _, f := range numFields {
				if _, err := jint("keyslot "+k+" "+where+"."+f, o[f]); err != nil {
					return err
				}
			}
			return nil
		}
		switch kdf["type"] {
		case "pbkdf2":
			err = need(kdf, "kdf", []string{"hash", "salt"}, []string{"iterations"})
		case "argon2i", "argon2id":
			err = need(kdf, "kdf", []string{"salt"}, []string{"time", "memory", "cpus"})
		default:
			err = bad("keyslot %s kdf type %v", k, kdf["type"])
		}
		if err != nil {
			return err
		}
		if kdf["salt"] == "" {
			return bad("keyslot %s kdf salt is empty", k)
		}
		if err := need(af, "af", []string{"type", "hash"}, []string{"stripes"}); err != nil {
			return err
		}
		if af["type"] != "luks1" {
			return bad("keyslot %s af type %q, LUKS2 knows only luks1", k, af["type"])
		}
		if err := need(area, "area", []string{"type", "encryption"}, []string{"key_size"}); err != nil {
			return err
		}
		off, err := u64str("keyslot "+k+" area offset", area["offset"])
		if err != nil {
			return err
		}
		sz, err := u64str("keyslot "+k+" area size", area["size"])
		if err != nil {
			return err
		}
		if sz == 0 {
			return bad("keyslot %s area size is 0", k)
		}
		if off < metaEnd || sz > ksSize || off-metaEnd > ksSize-sz {
			return bad("keyslot %s area %d+%d is outside the keyslots area %d+%d", k, off, sz, metaEnd, ksSize)
		}
		for _, a := range areas {
			if off < a.end && a.off < off+sz {
				return bad("keyslot %s area %d+%d overlaps keyslot %s's", k, off, sz, a.id)
			}
		}
		areas = append(areas, span{k, off, off + sz})
	}
	// Digests: every reference exists; each keyslot has exactly one digest.
	owner := map[string]string{}
	for k, dg := range digests {
		ks, err := refs("digest "+k+" keyslots", dg["keyslots"], keyslots)
		if err != nil {
			return err
		}
		if _, err := refs("digest "+k+" segments", dg["segments"], segments); err != nil {
			return err
		}
		for _, s := range ks {
			if o, ok := owner[s]; ok && o != k {
				return bad("keyslot %s is in digests %s and %s", s, o, k)
			}
			owner[s] = k
		}
	}
	for k := range keyslots {
		if _, ok := owner[k]; !ok {
			return bad("keyslot %s has no digest", k)
		}
	}
	for k, tk := range tokens {
		if tk["type"] == "" {
			return bad("token %s has an empty type", k)
		}
		if _, err := refs("token "+k+" keyslots", tk["keyslots"], keyslots); err != nil {
			return err
		}
	}
	return nil
}

func parseIDLimit(k string, limit int) (int, error) {
	id, err := strconv.Atoi(k)
	if err != nil || id < 0 || id >= limit || strconv.Itoa(id) != k {
		return 0, fmt.Errorf("id %q", k)
	}
	return id, nil
}

// u64str reads a LUKS2 decimal-string integer.
func u64str(what string, v any) (uint64, error) {
	s, ok := v.(string)
	if !ok {
		return 0, fmt.Errorf("%w: %s is missing or not a string", ErrRefused, what)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || s != strconv.FormatUint(n, 10) {
		return 0, fmt.Errorf("%w: %s %q is not a decimal integer", ErrRefused, what, s)
	}
	return n, nil
}

// jint reads a JSON integer that must fit 32 bits.
func jint(what string, v any) (int64, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("%w: %s is missing or not a number", ErrRefused, what)
	}
	i, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil || i < math.MinInt32 || i > math.MaxUint32 {
		return 0, fmt.Errorf("%w: %s %s is not a 32-bit integer", ErrRefused, what, n)
	}
	return i, nil
}

// noDuplicateKeys refuses an object with a repeated member name anywhere:
// parsers disagree about which copy wins, and a differential is exactly
// what an attacker needs.
func noDuplicateKeys(js []byte) error {
	d := json.NewDecoder(bytes.NewReader(js))
	d.UseNumber()
	type frame struct {
		obj  bool
		keys map[string]bool
		key  bool // next token in an object is a key
	}
	var st []*frame
	for {
		t, err := d.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var top *frame
		if len(st) > 0 {
			top = st[len(st)-1]
		}
		if top != nil && top.obj && top.key {
			if s, ok := t.(string); ok {
				if top.keys[s] {
					return fmt.Errorf("member %q appears twice", s)
				}
				top.keys[s] = true
				top.key = false
				continue
			}
		}
		switch t {
		case json.Delim('{'):
			st = append(st, &frame{obj: true, keys: map[string]bool{}, key: true})
			continue
		case json.Delim('['):
			st = append(st, &frame{})
			continue
		case json.Delim('}'), json.Delim(']'):
			st = st[:len(st)-1]
		}
		if len(st) > 0 && st[len(st)-1].obj {
			st[len(st)-1].key = true
		}
	}
}
