package keyserver

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// TokenBytes is the entropy of a bearer token.
const TokenBytes = 32

// maxTokenLen bounds what the server hashes from an Authorization header.
const maxTokenLen = 512

// NewToken returns a fresh bearer token (base64url, no padding: safe in
// headers, shells and kernel command lines) and the hash to store. The
// token itself is never stored.
func NewToken() (token string, hash []byte, err error) {
	b := make([]byte, TokenBytes)
	if _, err := rand.Read(b); err != nil {
		return "", nil, fmt.Errorf("new token: %w", err)
	}
	token = base64.RawURLEncoding.EncodeToString(b)
	clear(b)
	return token, HashToken(token), nil
}

// HashToken is what the store keeps of a token. A plain SHA-256 is enough:
// tokens are 256-bit random, so there is nothing to brute-force.
func HashToken(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

// TokenMatches compares in constant time, on hashes so that neither the
// length nor the content of the stored token shapes the timing.
func TokenMatches(hash []byte, token string) bool {
	if len(hash) != sha256.Size {
		return false
	}
	got := HashToken(token)
	return subtle.ConstantTimeCompare(hash, got) == 1
}

// MaxHostIDLen is the longest host id.
const MaxHostIDLen = 128

// ValidHostID checks a host id; the error quotes it.
func ValidHostID(id string) error {
	// keyproto holds the one rule the builder, the init and the server share.
	if !keyproto.ValidHostID(id) {
		if len(id) > MaxHostIDLen {
			return fmt.Errorf("invalid host id (%d bytes, at most %d)", len(id), MaxHostIDLen)
		}
		return fmt.Errorf("invalid host id %q: want a letter or digit, then up to %d of [A-Za-z0-9._-]", id, MaxHostIDLen-1)
	}
	return nil
}
