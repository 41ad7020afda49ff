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
	// Secondary is true when the primary copy was damaged and this is the
	// intact secondary; PrimaryErr then says what was wrong with it.
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
	if s.Offset+n > devSize {
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
func ReadHeader(r io.ReaderAt) (*Header, error) {
	h, perr := readHeaderAt(r, 0)
	if perr == nil {
		return h, nil
	}
	for _, off := range validHeaderSizes {
		h, err := readHeaderAt(r, off)
		if err == nil && h.Size == off {
			h.Secondary = true
			h.PrimaryErr = perr
			return h, nil
		}
	}
	return nil, fmt.Errorf("%w (no intact secondary copy either)", perr)
}

func readHeaderAt(r io.ReaderAt, off int64) (*Header, error) {
	bin := make([]byte, luks2BinSize)
	if _, err := r.ReadAt(bin, off); err != nil {
		return nil, fmt.Errorf("%w: read header at %d: %v", ErrRefused, off, err)
	}
	wantMagic := luksMagic
	if off != 0 {
		wantMagic = luksMagic2
	}
	if !bytes.Equal(bin[:6], wantMagic) {
		return nil, fmt.Errorf("%w: no LUKS magic at offset %d", ErrRefused, off)
	}
	ver := int(binary.BigEndian.Uint16(bin[6:8]))
	if ver != 2 {
		return nil, fmt.Errorf("%w: LUKS version %d, want 2", ErrRefused, ver)
	}
	size := int64(binary.BigEndian.Uint64(bin[8:16]))
	if size < 16<<10 || size > maxHdrSize || size&(size-1) != 0 {
		return nil, fmt.Errorf("%w: implausible header size %d", ErrRefused, size)
	}
	if hdrOff := int64(binary.BigEndian.Uint64(bin[0x100:0x108])); hdrOff != off {
		return nil, fmt.Errorf("%w: header at %d claims offset %d", ErrRefused, off, hdrOff)
	}
	if algo := cstr(bin[0x48 : 0x48+32]); algo != "sha256" {
		return nil, fmt.Errorf("%w: unsupported header checksum %q", ErrRefused, algo)
	}
	all := make([]byte, size)
	if _, err := r.ReadAt(all, off); err != nil {
		return nil, fmt.Errorf("%w: read header at %d: %v", ErrRefused, off, err)
	}
	want := append([]byte(nil), all[0x1c0:0x1c0+32]...)
	clear(all[0x1c0 : 0x1c0+64])
	if got := sha256.Sum256(all); !bytes.Equal(got[:], want) {
		return nil, fmt.Errorf("%w: header checksum mismatch at offset %d", ErrRefused, off)
	}
	js := all[luks2BinSize:]
	if i := bytes.IndexByte(js, 0); i >= 0 {
		js = js[:i]
	}
	h, err := parseJSON(js)
	if err != nil {
		return nil, err
	}
	h.Version = ver
	h.Size = size
	h.SeqID = binary.BigEndian.Uint64(bin[16:24])
	h.UUID = cstr(bin[0xa8 : 0xa8+40])
	h.Label = cstr(bin[0x18 : 0x18+48])
	return h, nil
}

var luksMagic2 = []byte("SKUL\xba\xbe")

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
	if err != nil || id < 0 || id > 1023 || strconv.Itoa(id) != k {
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
		if d.Iterations < 1 || len(d.Digest) < 16 || len(d.Salt) == 0 {
			return fmt.Errorf("%w: digest %d: %d iterations, %d-byte digest", ErrRefused, d.ID, d.Iterations, len(d.Digest))
		}
	}
	usable := 0
	for _, k := range h.Keyslots {
		if err := p.validateKeyslot(h, k, seg); err != nil {
			return err
		}
		if k.Priority > 0 && h.digestFor(k.ID) != nil {
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
	need := int64(k.KeySize) * afStripes
	if k.Area.Offset < 2*h.Size || k.Area.Offset%512 != 0 || k.Area.Size < need ||
		k.Area.Offset+k.Area.Size > seg.Offset {
		return ref("area %d+%d lies outside the keyslots area (%d..%d) or is too small", k.Area.Offset, k.Area.Size, 2*h.Size, seg.Offset)
	}
	switch k.KDF.Type {
	case "pbkdf2":
		if hashFunc(k.KDF.Hash) == nil || k.KDF.Iterations < 1 {
			return ref("pbkdf2 with hash %q, %d iterations", k.KDF.Hash, k.KDF.Iterations)
		}
	case "argon2i", "argon2id":
		maxMem := p.MaxKDFMemoryKiB
		if maxMem == 0 {
			maxMem = maxArgonMemKiB
		}
		if k.KDF.Time < 1 || k.KDF.Time > maxArgonTime || k.KDF.CPUs < 1 || k.KDF.CPUs > maxArgonCPUs ||
			k.KDF.Memory < 8*k.KDF.CPUs || k.KDF.Memory > maxMem {
			return ref("%s time %d, memory %d KiB, %d lanes is out of bounds (memory at most %d KiB)", k.KDF.Type, k.KDF.Time, k.KDF.Memory, k.KDF.CPUs, maxMem)
		}
	default:
		return ref("KDF %q", k.KDF.Type)
	}
	if len(k.KDF.Salt) == 0 {
		return ref("has an empty KDF salt")
	}
	if d := h.digestFor(k.ID); d != nil && !slices.Contains(d.Segments, seg.ID) {
		return ref("digest %d does not cover segment %d", d.ID, seg.ID)
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
// group in ascending id order (priority 0 slots are never tried).
func (h *Header) SlotOrder() []int {
	var hi, norm []int
	for _, k := range h.Keyslots {
		switch k.Priority {
		case 2:
			hi = append(hi, k.ID)
		case 1:
			norm = append(norm, k.ID)
		}
	}
	return append(hi, norm...)
}
