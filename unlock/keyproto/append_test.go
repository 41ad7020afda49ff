package keyproto

import (
	"bytes"
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
