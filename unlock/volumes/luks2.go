package volumes

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// Header is the part of a LUKS2 header the validator and the unlocker use.
type Header struct {
	Version   int
	UUID      string
	Label     string
	Size      int64 // binary header + JSON area
	Secondary bool  // true when the primary was damaged and this is the copy
	Segments  []Segment
	Keyslots  []Keyslot
	Flags     []string
}

// Segment is one LUKS2 data segment.
type Segment struct {
	ID         int
	Type       string
	Offset     int64
	Size       string // "dynamic" or bytes
	Encryption string
	SectorSize int
}

// Keyslot is one LUKS2 keyslot.
type Keyslot struct {
	ID       int
	Type     string
	KeySize  int // volume key size in bytes
	Priority int // 0 ignore, 1 normal, 2 high
	KDF      string
	AreaEnc  string
}

// Policy is what a header must satisfy before any key is tried (DESIGN §6).
// LUKS2 metadata is not authenticated: an attacker who can write the disk
// can rewrite it to, say, cipher_null, and the OS would then write
// plaintext. So the header is checked against what we expect, not trusted.
type Policy struct {
	// Ciphers allowed for data segments and keyslot areas.
	Ciphers []string
	// MinKeyBits is the smallest volume key accepted.
	MinKeyBits int
	// UUID, when set, must equal the header's UUID.
	UUID string
}

// DefaultCiphers are real ciphers with a tweakable or IV'd mode.
var DefaultCiphers = []string{
	"aes-xts-plain64", "aes-xts-plain", "aes-xts-essiv:sha256",
	"aes-cbc-essiv:sha256", "aes-adiantum-plain64",
	"serpent-xts-plain64", "twofish-xts-plain64", "camellia-xts-plain64",
	"xchacha20,aes-adiantum-plain64", "xchacha12,aes-adiantum-plain64",
}

// DefaultPolicy is used when the configuration says nothing more.
func DefaultPolicy() Policy {
	return Policy{Ciphers: DefaultCiphers, MinKeyBits: 256}
}

// ErrRefused is wrapped by every validation refusal.
var ErrRefused = errors.New("LUKS header refused")

const (
	luks2BinSize = 4096
	maxHdrSize   = 4 << 20
)

// validHeaderSizes are the LUKS2 header sizes cryptsetup may write; the
// secondary header sits right after the primary, at one of these offsets.
var validHeaderSizes = []int64{16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20}

// ReadHeader reads and checksums the primary LUKS2 header; if the primary is
// damaged it looks for an intact secondary and marks the result.
func ReadHeader(r io.ReaderAt) (*Header, error) {
	h, perr := readHeaderAt(r, 0)
	if perr == nil {
		return h, nil
	}
	for _, off := range validHeaderSizes {
		h, err := readHeaderAt(r, off)
		if err == nil && h.Size == off {
			h.Secondary = true
			return h, nil
		}
	}
	return nil, perr
}

func readHeaderAt(r io.ReaderAt, off int64) (*Header, error) {
	bin := make([]byte, luks2BinSize)
	if _, err := r.ReadAt(bin, off); err != nil {
		return nil, fmt.Errorf("read header at %d: %w", off, err)
	}
	if !bytes.Equal(bin[:6], luksMagic) && !bytes.Equal(bin[:6], []byte("SKUL\xba\xbe")) {
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
		return nil, fmt.Errorf("read header at %d: %w", off, err)
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
	h.UUID = cstr(bin[0xa8 : 0xa8+40])
	h.Label = cstr(bin[0x18 : 0x18+48])
	return h, nil
}

type jsonMeta struct {
	Keyslots map[string]struct {
		Type     string `json:"type"`
		KeySize  int    `json:"key_size"`
		Priority *int   `json:"priority"`
		KDF      struct {
			Type string `json:"type"`
		} `json:"kdf"`
		Area struct {
			Encryption string `json:"encryption"`
		} `json:"area"`
	} `json:"keyslots"`
	Segments map[string]struct {
		Type       string `json:"type"`
		Offset     string `json:"offset"`
		Size       string `json:"size"`
		Encryption string `json:"encryption"`
		SectorSize int    `json:"sector_size"`
	} `json:"segments"`
	Config struct {
		Flags []string `json:"flags"`
	} `json:"config"`
}

func parseJSON(js []byte) (*Header, error) {
	var m jsonMeta
	if err := json.Unmarshal(js, &m); err != nil {
		return nil, fmt.Errorf("%w: JSON metadata: %v", ErrRefused, err)
	}
	h := &Header{Flags: m.Config.Flags}
	for k, s := range m.Segments {
		id, err := strconv.Atoi(k)
		if err != nil {
			return nil, fmt.Errorf("%w: segment id %q", ErrRefused, k)
		}
		off, err := strconv.ParseInt(s.Offset, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: segment %d offset %q", ErrRefused, id, s.Offset)
		}
		h.Segments = append(h.Segments, Segment{ID: id, Type: s.Type, Offset: off, Size: s.Size, Encryption: s.Encryption, SectorSize: s.SectorSize})
	}
	for k, ks := range m.Keyslots {
		id, err := strconv.Atoi(k)
		if err != nil {
			return nil, fmt.Errorf("%w: keyslot id %q", ErrRefused, k)
		}
		prio := 1
		if ks.Priority != nil {
			prio = *ks.Priority
		}
		h.Keyslots = append(h.Keyslots, Keyslot{ID: id, Type: ks.Type, KeySize: ks.KeySize, Priority: prio, KDF: ks.KDF.Type, AreaEnc: ks.Area.Encryption})
	}
	slices.SortFunc(h.Segments, func(a, b Segment) int { return a.ID - b.ID })
	slices.SortFunc(h.Keyslots, func(a, b Keyslot) int { return a.ID - b.ID })
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
	if len(h.Segments) == 0 {
		return fmt.Errorf("%w: no data segment", ErrRefused)
	}
	for _, s := range h.Segments {
		if s.Type != "crypt" {
			return fmt.Errorf("%w: segment %d has type %q, only \"crypt\" is allowed", ErrRefused, s.ID, s.Type)
		}
		if !p.allowed(s.Encryption) {
			return fmt.Errorf("%w: segment %d cipher %q is not on the allow-list", ErrRefused, s.ID, s.Encryption)
		}
		if s.SectorSize != 512 && s.SectorSize != 1024 && s.SectorSize != 2048 && s.SectorSize != 4096 {
			return fmt.Errorf("%w: segment %d sector size %d", ErrRefused, s.ID, s.SectorSize)
		}
	}
	usable := 0
	for _, k := range h.Keyslots {
		if !p.allowed(k.AreaEnc) {
			return fmt.Errorf("%w: keyslot %d area cipher %q is not on the allow-list", ErrRefused, k.ID, k.AreaEnc)
		}
		if k.KeySize*8 < p.MinKeyBits {
			return fmt.Errorf("%w: keyslot %d holds a %d-bit key, at least %d required", ErrRefused, k.ID, k.KeySize*8, p.MinKeyBits)
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

func (p Policy) allowed(c string) bool {
	if strings.Contains(c, "null") {
		return false
	}
	for _, a := range p.Ciphers {
		if a == c {
			return true
		}
	}
	return false
}

// SlotOrder returns keyslot ids, high priority first, then normal, each
// group in ascending id order (priority 0 slots are never tried).
// luks.go's own order comes from a map and is random.
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
