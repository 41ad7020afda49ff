// Package keyproto holds the wire format of the key-server protocol
// (DESIGN §5), shared by the boot-time client and the reference server.
package keyproto

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// MaxBody is the largest response body a client accepts.
const MaxBody = 64 << 10

// Media types of the two accepted response forms.
const (
	ContentTypeJSON = "application/json"
	ContentTypeRaw  = "application/octet-stream"
)

// HostPlaceholder in a key URL is replaced by the host id.
const HostPlaceholder = "{host}"

// Key is one entry of a JSON key list.
type Key struct {
	ID  string `json:"id"`
	Key string `json:"key"` // base64 (standard) of the LUKS passphrase
}

// Response is the JSON body of a 200 answer. The first key is current; the
// rest are older or next keys during a rotation.
type Response struct {
	Keys []Key `json:"keys"`
	// State is the host's lifecycle state (StateNew, StateActive,
	// StateRotating); empty from servers that predate it, which the
	// client reads as "not new": it never provisions on an empty state.
	State string `json:"state,omitempty"`
}

// Host lifecycle states a response may carry.
const (
	// StateNew: the current key was never used to format a volume. Only
	// then may a host format a blank device with it (provision: true).
	StateNew = "new"
	// StateActive: the host's volumes use the current key.
	StateActive = "active"
	// StateRotating: keys are [next, old...]; the host moves its volumes
	// to the first key and confirms.
	StateRotating = "rotating"
)

// ConfirmSuffix follows the host's key URL for a confirmation: POST
// <key URL>/confirm with a Confirmation body, same token, same TLS trust.
const ConfirmSuffix = "/confirm"

// MaxConfirmBody bounds a confirmation body; the server refuses more.
const MaxConfirmBody = 1 << 10

// Confirmation events.
const (
	// EventProvisioned: the host formatted its volumes with key Key (the
	// current key, served with StateNew), or found them formatted with it.
	EventProvisioned = "provisioned"
	// EventRotated: every volume of the host opens with key Key (the
	// current key) and no longer with the older ones.
	EventRotated = "rotated"
)

// Confirmation is the JSON body of a confirmation request. It names key
// ids only, never key material.
type Confirmation struct {
	Event string `json:"event"`
	Key   string `json:"key"`
}

// Validate checks the fields of a confirmation.
func (c Confirmation) Validate() error {
	if c.Event != EventProvisioned && c.Event != EventRotated {
		return fmt.Errorf("confirmation: event %q: want %q or %q", c.Event, EventProvisioned, EventRotated)
	}
	if c.Key == "" || len(c.Key) > 128 {
		return fmt.Errorf("confirmation: key id of %d bytes: want 1 to 128", len(c.Key))
	}
	return nil
}

// Decoded is a decoded 200 answer: passphrases in server order, their ids
// (empty for the raw form) and the host's state (empty when not sent).
type Decoded struct {
	Keys  [][]byte
	IDs   []string
	State string
}

// ErrBadResponse is wrapped by every decode error. Decode errors never
// contain body bytes: the body is key material.
var ErrBadResponse = errors.New("bad key response")

// Decode turns a 200 body into passphrases, in server order. contentType is
// the response's Content-Type header (parameters allowed). The caller owns
// and must wipe the returned slices.
//
// Key material is only ever copied into byte slices that are returned or
// wiped: the JSON is parsed in place (encoding/json's Unmarshal does not
// copy its input, unlike a Decoder), each key's JSON string is taken as
// raw bytes, unescaped and base64-decoded by hand. Unknown fields are
// ignored, so that a server can add some without breaking older images.
func Decode(contentType string, body []byte) ([][]byte, error) {
	d, err := DecodeResponse(contentType, body)
	return d.Keys, err
}

// DecodeResponse is Decode that also returns the key ids and the state.
func DecodeResponse(contentType string, body []byte) (Decoded, error) {
	if len(body) > MaxBody {
		return Decoded{}, fmt.Errorf("%w: body of %d bytes exceeds %d", ErrBadResponse, len(body), MaxBody)
	}
	mt := strings.TrimSpace(strings.ToLower(strings.SplitN(contentType, ";", 2)[0]))
	switch mt {
	case ContentTypeRaw:
		if len(body) == 0 {
			return Decoded{}, fmt.Errorf("%w: empty %s body", ErrBadResponse, ContentTypeRaw)
		}
		k := make([]byte, len(body))
		copy(k, body)
		return Decoded{Keys: [][]byte{k}, IDs: []string{""}}, nil
	case ContentTypeJSON:
		var r struct {
			Keys []struct {
				ID  string          `json:"id"`
				Key json.RawMessage `json:"key"`
			} `json:"keys"`
			State string `json:"state"`
		}
		err := json.Unmarshal(body, &r)
		defer func() {
			for _, k := range r.Keys {
				clear(k.Key)
			}
		}()
		if err != nil {
			// json errors may quote input; report only the kind of problem.
			return Decoded{}, fmt.Errorf("%w: invalid JSON key list", ErrBadResponse)
		}
		if len(r.Keys) == 0 {
			return Decoded{}, fmt.Errorf("%w: empty key list", ErrBadResponse)
		}
		out := make([][]byte, 0, len(r.Keys))
		ids := make([]string, 0, len(r.Keys))
		for i, k := range r.Keys {
			b, ok := decodeKey(k.Key)
			if !ok {
				Wipe(out)
				return Decoded{}, fmt.Errorf("%w: keys[%d] (id %q): not a non-empty base64 string", ErrBadResponse, i, k.ID)
			}
			out = append(out, b)
			ids = append(ids, k.ID)
		}
		return Decoded{Keys: out, IDs: ids, State: r.State}, nil
	default:
		return Decoded{}, fmt.Errorf("%w: unsupported content type %q (want %s or %s)", ErrBadResponse, mt, ContentTypeJSON, ContentTypeRaw)
	}
}

// decodeKey turns a raw JSON string holding base64 (padded or not) into
// the key bytes, wiping its intermediate copy.
func decodeKey(raw json.RawMessage) ([]byte, bool) {
	s, ok := unquote(raw)
	defer clear(s)
	if !ok {
		return nil, false
	}
	enc := base64.StdEncoding
	if len(s)%4 != 0 {
		enc = base64.RawStdEncoding
	}
	out := make([]byte, enc.DecodedLen(len(s)))
	n, err := enc.Decode(out, s)
	if err != nil || n == 0 {
		clear(out)
		return nil, false
	}
	clear(out[n:])
	return out[:n], true
}

// unquote decodes a JSON string literal into a fresh slice. Only escapes
// of ASCII characters can occur in base64 text ("\/" is common: some
// encoders escape every slash); anything else is refused.
func unquote(raw []byte) ([]byte, bool) {
	if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' {
		return nil, false
	}
	raw = raw[1 : len(raw)-1]
	out := make([]byte, 0, len(raw))
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c != '\\' {
			out = append(out, c)
			continue
		}
		if i+1 >= len(raw) {
			return out, false
		}
		i++
		switch raw[i] {
		case '"', '\\', '/':
			out = append(out, raw[i])
		case 'u':
			if i+4 >= len(raw) {
				return out, false
			}
			var r rune
			for _, h := range raw[i+1 : i+5] {
				switch {
				case '0' <= h && h <= '9':
					r = r<<4 | rune(h-'0')
				case 'a' <= h && h <= 'f':
					r = r<<4 | rune(h-'a'+10)
				case 'A' <= h && h <= 'F':
					r = r<<4 | rune(h-'A'+10)
				default:
					return out, false
				}
			}
			if r < 0x20 || r >= 0x80 {
				// Not base64 anyway; and encoding/base64 would skip a
				// CR or LF, so one must not slip in this way.
				return out, false
			}
			out = append(out, byte(r))
			i += 4
		default:
			// \b \f \n \r \t: never part of base64.
			return out, false
		}
	}
	return out, true
}

// Encode builds a JSON body for the given keys (first is current).
func Encode(ids []string, keys [][]byte) ([]byte, error) {
	if len(ids) != len(keys) {
		return nil, errors.New("keyproto: ids and keys differ in length")
	}
	r := Response{Keys: make([]Key, len(keys))}
	for i := range keys {
		r.Keys[i] = Key{ID: ids[i], Key: base64.StdEncoding.EncodeToString(keys[i])}
	}
	return json.Marshal(r)
}

// Wipe zeroes every key in place.
func Wipe(keys [][]byte) {
	for _, k := range keys {
		clear(k)
	}
}

// ValidHostID reports whether id can be a host id: one URL path segment
// that needs no escaping (1-128 bytes of letters, digits, ".", "_" and
// "-", starting with a letter or digit). The image builder, the init and
// the key server all apply this one rule.
func ValidHostID(id string) bool {
	if len(id) == 0 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		b := id[i]
		ok := b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9'
		if i > 0 && (b == '.' || b == '_' || b == '-') {
			ok = true
		}
		if !ok {
			return false
		}
	}
	return true
}
