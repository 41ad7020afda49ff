// Package keyproto holds the wire format of the key-server protocol
// (DESIGN §5), shared by the boot-time client and the reference server.
package keyproto

import (
	"bytes"
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
}

// ErrBadResponse is wrapped by every decode error. Decode errors never
// contain body bytes: the body is key material.
var ErrBadResponse = errors.New("bad key response")

// Decode turns a 200 body into passphrases, in server order. contentType is
// the response's Content-Type header (parameters allowed). The caller owns
// and must wipe the returned slices.
func Decode(contentType string, body []byte) ([][]byte, error) {
	if len(body) > MaxBody {
		return nil, fmt.Errorf("%w: body of %d bytes exceeds %d", ErrBadResponse, len(body), MaxBody)
	}
	mt := strings.TrimSpace(strings.ToLower(strings.SplitN(contentType, ";", 2)[0]))
	switch mt {
	case ContentTypeRaw:
		if len(body) == 0 {
			return nil, fmt.Errorf("%w: empty %s body", ErrBadResponse, ContentTypeRaw)
		}
		k := make([]byte, len(body))
		copy(k, body)
		return [][]byte{k}, nil
	case ContentTypeJSON:
		var r Response
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&r); err != nil {
			// json errors may quote input; report only the kind of problem.
			return nil, fmt.Errorf("%w: invalid JSON key list", ErrBadResponse)
		}
		if len(r.Keys) == 0 {
			return nil, fmt.Errorf("%w: empty key list", ErrBadResponse)
		}
		out := make([][]byte, 0, len(r.Keys))
		for i, k := range r.Keys {
			b, err := base64.StdEncoding.DecodeString(k.Key)
			if err != nil || len(b) == 0 {
				Wipe(out)
				return nil, fmt.Errorf("%w: keys[%d] (id %q): not non-empty base64", ErrBadResponse, i, k.ID)
			}
			out = append(out, b)
		}
		return out, nil
	default:
		return nil, fmt.Errorf("%w: unsupported content type %q", ErrBadResponse, mt)
	}
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
