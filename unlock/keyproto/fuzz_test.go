package keyproto

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
)

// marker stands for key material: an error may quote a key's id or the
// content type (neither is secret), never anything else of the body.
const marker = "K3YM4T3R14L"

// FuzzDecode: Decode never panics; whatever it accepts, encoding/json
// plus encoding/base64 decode to the same keys (our hand-written unquote
// and base64 path agrees with the standard library); whatever the
// standard library accepts as a non-empty list of non-empty base64 keys,
// Decode accepts too; and errors quote no key material.
func FuzzDecode(f *testing.F) {
	f.Add(ContentTypeJSON, []byte(`{"keys":[{"id":"2026-11","key":"AAECAw=="}]}`))
	f.Add(ContentTypeJSON+"; charset=utf-8", []byte(`{"keys":[{"id":"a","key":"\/\/8="},{"id":"b","key":"AQID"}]}`))
	f.Add(ContentTypeJSON, []byte(`{"keys":[{"id":"a","key":"\u0041QID"}],"extra":{"key":"x"}}`))
	f.Add(ContentTypeJSON, []byte(`{"keys":[{"id":"a","key":"`+marker+`!"}]}`))
	f.Add(ContentTypeJSON, []byte(`{"keys":[{"id":"a","key":"`+marker+`"}`))
	f.Add(ContentTypeRaw, []byte(marker))
	f.Add("text/html", []byte(marker))
	f.Fuzz(func(t *testing.T, ct string, body []byte) {
		got, err := Decode(ct, body)
		if err != nil {
			e := err.Error()
			if strings.Contains(e, marker) && !strings.Contains(ct, marker) && !idsContain(body, marker) {
				t.Fatalf("error quotes key material: %s", e)
			}
		}
		mt := strings.TrimSpace(strings.ToLower(strings.SplitN(ct, ";", 2)[0]))
		if mt != ContentTypeJSON {
			if err == nil && (mt != ContentTypeRaw || !bytes.Equal(got[0], body) || len(got) != 1) {
				t.Fatalf("raw decode: %q from %q", got, body)
			}
			return
		}
		want, stdOK := stdDecode(body)
		if err == nil {
			if !stdOK {
				t.Fatalf("Decode accepted %q, the standard library does not", body)
			}
			if len(got) != len(want) {
				t.Fatalf("%d keys, standard library %d", len(got), len(want))
			}
			for i := range got {
				if !bytes.Equal(got[i], want[i]) {
					t.Fatalf("key %d = %x, standard library %x", i, got[i], want[i])
				}
			}
			// And it round-trips through the server's encoder.
			ids := make([]string, len(got))
			enc, err := AppendJSON(nil, ids, got)
			if err != nil {
				t.Fatal(err)
			}
			again, err := Decode(ContentTypeJSON, enc)
			if err != nil || len(again) != len(got) {
				t.Fatalf("re-encoded %s does not decode: %v", enc, err)
			}
			Wipe(got)
		} else if stdOK && len(body) <= MaxBody {
			t.Fatalf("Decode refused %q (%v), the standard library accepts it", body, err)
		}
	})
}

// stdDecode is the reference: encoding/json strings, base64 padded when
// the length says so, unpadded otherwise.
func stdDecode(body []byte) ([][]byte, bool) {
	var r struct {
		Keys []struct {
			Key *string `json:"key"`
		} `json:"keys"`
	}
	if json.Unmarshal(body, &r) != nil || len(r.Keys) == 0 {
		return nil, false
	}
	var out [][]byte
	for _, k := range r.Keys {
		// encoding/base64 skips CR and LF; a key has none.
		if k.Key == nil || strings.ContainsAny(*k.Key, "\r\n") {
			return nil, false
		}
		enc := base64.StdEncoding
		if len(*k.Key)%4 != 0 {
			enc = base64.RawStdEncoding
		}
		b, err := enc.DecodeString(*k.Key)
		if err != nil || len(b) == 0 {
			return nil, false
		}
		out = append(out, b)
	}
	return out, true
}

func idsContain(body []byte, s string) bool {
	var r struct {
		Keys []struct {
			ID any `json:"id"`
		} `json:"keys"`
	}
	_ = json.Unmarshal(body, &r)
	for _, k := range r.Keys {
		if id, ok := k.ID.(string); ok && strings.Contains(id, s) {
			return true
		}
	}
	return false
}

func TestDecodeEscapes(t *testing.T) {
	for _, tc := range []struct {
		body string
		want []byte
		ok   bool
	}{
		{`{"keys":[{"id":"a","key":"\/\/8="}]}`, []byte{0xff, 0xff}, true},
		{`{"keys":[{"id":"a","key":"\u0041QID"}]}`, []byte{1, 2, 3}, true},
		{`{"keys":[{"id":"a","key":"AQID\n"}]}`, nil, false},
		{`{"keys":[{"id":"a","key":"\u00e9QID"}]}`, nil, false},
		{`{"keys":[{"id":"a","key":null}]}`, nil, false},
		{`{"keys":[{"id":"a"}]}`, nil, false},
		{`{"keys":[{"id":"a","key":"AQID"}],"future":true}`, []byte{1, 2, 3}, true},
	} {
		got, err := Decode(ContentTypeJSON, []byte(tc.body))
		if (err == nil) != tc.ok || (tc.ok && !bytes.Equal(got[0], tc.want)) {
			t.Errorf("Decode(%s) = %x, %v", tc.body, got, err)
		}
	}
}
