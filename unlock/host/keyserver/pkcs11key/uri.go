// Package pkcs11key keeps the key server's master key in a PKCS#11 token
// (an HSM, or SoftHSM2), named by an RFC 7512 URI:
//
//	pkcs11:token=LABEL;object=LABEL?module-path=/path/lib.so&pin-source=file:/path
//
// The token holds a non-extractable AES-256 key. At start the server has
// the token derive the 32-byte master key from it (NIST SP 800-108 KDF in
// counter mode, AES-CMAC as the PRF, computed inside the token) and keeps
// that in memory, so key serving costs no token call: the token's own key
// never leaves it, and every replica using the same token key derives the
// same master key, hence the same master-key id and seal format as a
// master key file.
//
// Talking to a module needs cgo (a module is a shared library); a build
// without cgo parses URIs but refuses to open them.
package pkcs11key

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
)

// Scheme starts every URI this package reads.
const Scheme = "pkcs11:"

// IsURI says whether s names a PKCS#11 object rather than a file.
func IsURI(s string) bool { return strings.HasPrefix(s, Scheme) }

// URI is the parsed form of a PKCS#11 URI. Only what selects a token and
// a secret key, and how to log in, is accepted.
type URI struct {
	// Token selection (path attributes); Token is required.
	Token, Manufacturer, Serial, Model string
	SlotID                             *uint
	// Object is the key's label (CKA_LABEL), required; ID its CKA_ID.
	Object string
	ID     []byte
	// ModulePath is the PKCS#11 module (query attribute), required.
	ModulePath string

	pinValue  string
	pinSource string
}

// Parse reads an RFC 7512 URI. Errors name the attribute at fault and
// never repeat a pin-value.
func Parse(s string) (*URI, error) {
	rest, ok := strings.CutPrefix(s, Scheme)
	if !ok {
		return nil, fmt.Errorf("pkcs11 URI: must start with %q", Scheme)
	}
	path, query, _ := strings.Cut(rest, "?")
	u := &URI{}
	seen := map[string]bool{}
	attr := func(part, sep string) error {
		if part == "" {
			return nil
		}
		name, raw, ok := strings.Cut(part, "=")
		if !ok {
			return fmt.Errorf("pkcs11 URI: attribute %q has no value (want name=value)", name)
		}
		if seen[name] {
			return fmt.Errorf("pkcs11 URI: attribute %s given twice", name)
		}
		seen[name] = true
		val, err := url.PathUnescape(raw)
		if err != nil {
			return fmt.Errorf("pkcs11 URI: attribute %s: bad percent-escape", name)
		}
		if err := u.set(name, val, sep); err != nil {
			return fmt.Errorf("pkcs11 URI: %w", err)
		}
		return nil
	}
	for _, p := range strings.Split(path, ";") {
		if err := attr(p, ";"); err != nil {
			return nil, err
		}
	}
	if query != "" {
		for _, p := range strings.Split(query, "&") {
			if err := attr(p, "&"); err != nil {
				return nil, err
			}
		}
	}
	switch {
	case u.Token == "":
		return nil, errors.New("pkcs11 URI: token=LABEL is required (the token's label)")
	case u.Object == "":
		return nil, errors.New("pkcs11 URI: object=LABEL is required (the master key's label)")
	case u.ModulePath == "":
		return nil, errors.New("pkcs11 URI: module-path=/path/to/module.so is required")
	case u.pinValue == "" && u.pinSource == "":
		return nil, errors.New("pkcs11 URI: pin-value or pin-source is required (the token's user PIN)")
	case u.pinValue != "" && u.pinSource != "":
		return nil, errors.New("pkcs11 URI: pin-value and pin-source exclude each other")
	}
	return u, nil
}

// set stores one attribute; sep is ";" for path, "&" for query ones.
func (u *URI) set(name, val, sep string) error {
	query := sep == "&"
	switch {
	case !query && name == "token":
		u.Token = val
	case !query && name == "manufacturer":
		u.Manufacturer = val
	case !query && name == "serial":
		u.Serial = val
	case !query && name == "model":
		u.Model = val
	case !query && name == "slot-id":
		n, err := strconv.ParseUint(val, 10, 32)
		if err != nil {
			return fmt.Errorf("slot-id %q: not a decimal number", val)
		}
		id := uint(n)
		u.SlotID = &id
	case !query && name == "object":
		u.Object = val
	case !query && name == "id":
		u.ID = []byte(val)
	case !query && name == "type":
		if val != "secret-key" {
			return fmt.Errorf("type=%s: the master key is a secret-key", val)
		}
	case query && name == "module-path":
		u.ModulePath = val
	case query && name == "pin-value":
		u.pinValue = val
	case query && name == "pin-source":
		u.pinSource = val
	case query && name == "module-name":
		return errors.New("module-name is not supported: give module-path=/path/to/module.so")
	default:
		where := "path"
		if query {
			where = "query"
		}
		return fmt.Errorf("unsupported %s attribute %q", where, name)
	}
	return nil
}

// PIN returns the user PIN: pin-value, or the first line of the file
// pin-source names (a path or a file: URI).
func (u *URI) PIN() (string, error) {
	if u.pinSource == "" {
		return u.pinValue, nil
	}
	path := u.pinSource
	if p, ok := strings.CutPrefix(path, "file:"); ok {
		path = strings.TrimPrefix(p, "//")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("pkcs11 URI pin-source: %w", err)
	}
	pin, _, _ := strings.Cut(string(b), "\n")
	clear(b)
	if pin = strings.TrimRight(pin, "\r"); pin == "" {
		return "", fmt.Errorf("pkcs11 URI pin-source %s: empty", path)
	}
	return pin, nil
}

// String is the URI with any pin-value replaced, safe for logs.
func (u *URI) String() string {
	esc := func(s string) string { return strings.ReplaceAll(url.PathEscape(s), ";", "%3B") }
	parts := []string{"token=" + esc(u.Token)}
	for _, a := range []struct{ n, v string }{{"manufacturer", u.Manufacturer}, {"serial", u.Serial}, {"model", u.Model}} {
		if a.v != "" {
			parts = append(parts, a.n+"="+esc(a.v))
		}
	}
	if u.SlotID != nil {
		parts = append(parts, "slot-id="+strconv.FormatUint(uint64(*u.SlotID), 10))
	}
	parts = append(parts, "object="+esc(u.Object))
	if u.ID != nil {
		parts = append(parts, "id="+url.PathEscape(string(u.ID)))
	}
	q := "module-path=" + esc(u.ModulePath)
	if u.pinSource != "" {
		q += "&pin-source=" + esc(u.pinSource)
	} else {
		q += "&pin-value=REDACTED"
	}
	return Scheme + strings.Join(parts, ";") + "?" + q
}
