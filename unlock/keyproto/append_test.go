package keyproto

import (
	"bytes"
	"encoding/json"
	"testing"
)

func TestAppendJSONMatchesEncode(t *testing.T) {
	for _, tc := range []struct {
		ids  []string
		keys [][]byte
	}{
		{[]string{"2026-11"}, [][]byte{bytes.Repeat([]byte{0xff}, 32)}},
		{[]string{"2026-12", "2026-11"}, [][]byte{[]byte("new"), []byte("o")}},
		{[]string{`we"ird<&>`, "é"}, [][]byte{{0}, {1, 2}}},
		{nil, nil},
	} {
		want, err := Encode(tc.ids, tc.keys)
		if err != nil {
			t.Fatal(err)
		}
		prefix := []byte("xx")
		got, err := AppendJSON(prefix, tc.ids, tc.keys)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[2:], want) || string(got[:2]) != "xx" {
			t.Errorf("AppendJSON = %s, Encode = %s", got, want)
		}
		if len(tc.keys) > 0 {
			dec, err := Decode(ContentTypeJSON, got[2:])
			if err != nil || len(dec) != len(tc.keys) || !bytes.Equal(dec[0], tc.keys[0]) {
				t.Errorf("Decode(AppendJSON) = %q, %v", dec, err)
			}
		}
	}
	if _, err := AppendJSON(nil, []string{"a"}, nil); err == nil {
		t.Error("length mismatch accepted")
	}
}

func TestStateRoundTrip(t *testing.T) {
	body, err := AppendResponse(nil, StateNew, []string{"2026-12", "2026-11"}, [][]byte{[]byte("n"), []byte("o")})
	if err != nil {
		t.Fatal(err)
	}
	d, err := DecodeResponse(ContentTypeJSON, body)
	if err != nil || d.State != StateNew || len(d.IDs) != 2 || d.IDs[1] != "2026-11" || string(d.Keys[0]) != "n" {
		t.Fatalf("DecodeResponse(%s) = %+v, %v", body, d, err)
	}
	var r Response
	if err := json.Unmarshal(body, &r); err != nil || r.State != StateNew {
		t.Fatalf("encoding/json reads %s as %+v, %v", body, r, err)
	}
	d, err = DecodeResponse(ContentTypeJSON, []byte(`{"keys":[{"id":"a","key":"eA=="}]}`))
	if err != nil || d.State != "" {
		t.Fatalf("no state: %+v, %v", d, err)
	}
	for _, c := range []Confirmation{{"provisioned", ""}, {"formatted", "a"}} {
		if c.Validate() == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}
