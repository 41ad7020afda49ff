package keyserver

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func testSealer(t testing.TB, fill byte) *Sealer {
	t.Helper()
	s, err := NewSealer(bytes.Repeat([]byte{fill}, MasterKeySize))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSealRoundTrip(t *testing.T) {
	s := testSealer(t, 1)
	key := []byte("a LUKS passphrase of any length")
	sealed, err := s.Seal("db-1", "2026-11", key)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, key) {
		t.Fatal("sealed key contains the plaintext")
	}
	again, _ := s.Seal("db-1", "2026-11", key)
	if bytes.Equal(sealed, again) {
		t.Fatal("two seals of one key are equal: nonce reused")
	}
	got, err := s.Unseal("db-1", "2026-11", sealed)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unseal = %q, %v", got, err)
	}
}

func TestUnsealRefuses(t *testing.T) {
	s := testSealer(t, 1)
	sealed, err := s.Seal("db-1", "2026-11", bytes.Repeat([]byte{7}, KeySize))
	if err != nil {
		t.Fatal(err)
	}
	flip := func(i int) []byte {
		b := bytes.Clone(sealed)
		b[i] ^= 0x01
		return b
	}
	for _, tc := range []struct {
		name     string
		host, id string
		sealed   []byte
		sealer   *Sealer
	}{
		{"version byte", "db-1", "2026-11", flip(0), s},
		{"nonce", "db-1", "2026-11", flip(1), s},
		{"ciphertext", "db-1", "2026-11", flip(20), s},
		{"tag", "db-1", "2026-11", flip(len(sealed) - 1), s},
		{"truncated", "db-1", "2026-11", sealed[:len(sealed)-1], s},
		{"empty", "db-1", "2026-11", nil, s},
		{"moved to another host", "db-2", "2026-11", sealed, s},
		{"host id prefix", "db-", "12026-11", sealed, s},
		{"other key id", "db-1", "2026-10", sealed, s},
		{"wrong master key", "db-1", "2026-11", sealed, testSealer(t, 2)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.sealer.Unseal(tc.host, tc.id, tc.sealed)
			if !errors.Is(err, ErrUnseal) || got != nil {
				t.Fatalf("Unseal = %x, %v; want ErrUnseal", got, err)
			}
			if !strings.Contains(err.Error(), tc.host) {
				t.Fatalf("error %q does not name the host", err)
			}
		})
	}
}

func TestSealerID(t *testing.T) {
	a, b := testSealer(t, 1), testSealer(t, 2)
	if a.ID() == b.ID() || a.ID() != testSealer(t, 1).ID() || !strings.HasPrefix(a.ID(), "mk1-") {
		t.Fatalf("ids %q %q", a.ID(), b.ID())
	}
	if _, err := NewSealer(make([]byte, 16)); err == nil {
		t.Fatal("16-byte master key accepted")
	}
}

func TestMasterKeyFile(t *testing.T) {
	dir := t.TempDir()
	raw := bytes.Repeat([]byte{0xab}, MasterKeySize)
	for name, content := range map[string][]byte{
		"raw":    raw,
		"hex":    []byte(hex.EncodeToString(raw) + "\n"),
		"base64": []byte("  " + base64.StdEncoding.EncodeToString(raw) + "\n"),
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, content, 0o600)
		got, err := LoadMasterKey(p)
		if err != nil || !bytes.Equal(got, raw) {
			t.Errorf("%s: %x, %v", name, got, err)
		}
	}
	for name, content := range map[string][]byte{
		"short":    raw[:31],
		"bad hex":  []byte(strings.Repeat("zz", 32)),
		"too long": bytes.Repeat([]byte{1}, 4096),
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, content, 0o600)
		if _, err := LoadMasterKey(p); err == nil || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: err %v", name, err)
		}
	}
	p := filepath.Join(dir, "open")
	os.WriteFile(p, raw, 0o644)
	if _, err := LoadMasterKey(p); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("group-readable key: %v", err)
	}

	// CreateMasterKey never replaces a key.
	p = filepath.Join(dir, "master.key")
	k1, err := CreateMasterKey(p)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}
	k2, err := CreateMasterKey(p)
	if err != nil || !bytes.Equal(k1, k2) {
		t.Fatalf("second CreateMasterKey replaced the key: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 8 {
		t.Fatalf("left temporary files: %v", ents)
	}
}

func TestTokens(t *testing.T) {
	tok, hash, err := NewToken()
	if err != nil {
		t.Fatal(err)
	}
	if len(tok) != 43 || strings.ContainsAny(tok, "+/=") {
		t.Fatalf("token %q is not 32 bytes of base64url", tok)
	}
	tok2, _, _ := NewToken()
	if tok == tok2 {
		t.Fatal("tokens repeat")
	}
	if !TokenMatches(hash, tok) || TokenMatches(hash, tok2) || TokenMatches(hash, "") || TokenMatches(nil, tok) {
		t.Fatal("TokenMatches wrong")
	}
	if bytes.Contains(hash, []byte(tok)) {
		t.Fatal("hash holds the token")
	}
}

func TestValidHostID(t *testing.T) {
	for _, ok := range []string{"a", "db-1", "4c4c4544-0042-3510-8052-b4c04f333432", "A.b_c-9", strings.Repeat("x", 128)} {
		if err := ValidHostID(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "-a", ".a", "a/b", "a b", "a%2f", "é", "a\x00", strings.Repeat("x", 129)} {
		if err := ValidHostID(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
