package keys

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Sources locates the host's identity and credentials. The zero value reads
// the real system; tests point the paths at fixtures.
type Sources struct {
	// SysRoot prefixes /sys paths (default "/").
	SysRoot string
	// FileRoot prefixes file:PATH token paths (default "/").
	FileRoot string
	// CmdlineHost and CmdlineToken are rd.unlockrd.host= and
	// rd.unlockrd.token= (empty when absent).
	CmdlineHost  string
	CmdlineToken string
}

// Credential names (systemd's io.systemd.credential convention).
const (
	CredHost  = "unlockrd.host"
	CredToken = "unlockrd.token"
)

var hostIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// HostID resolves key.host: "smbios-uuid", "cmdline", "credential" or a
// literal id. rd.unlockrd.host= on the command line overrides any source,
// since the command line is how one netboot image serves many hosts.
func (s Sources) HostID(source string) (id, from string, err error) {
	if s.CmdlineHost != "" {
		return s.CmdlineHost, "rd.unlockrd.host", nil
	}
	switch source {
	case "", "smbios-uuid":
		p := filepath.Join(s.sysRoot(), "sys/class/dmi/id/product_uuid")
		b, err := os.ReadFile(p)
		if err != nil {
			return "", "", fmt.Errorf("host id from SMBIOS: %w", err)
		}
		id := strings.ToLower(strings.TrimSpace(string(b)))
		if !hostIDRE.MatchString(id) {
			return "", "", fmt.Errorf("host id from SMBIOS: %s holds no usable UUID", p)
		}
		return id, "smbios-uuid", nil
	case "cmdline":
		return "", "", errors.New("host id: key.host is cmdline but rd.unlockrd.host= is not on the kernel command line")
	case "credential":
		v, err := s.Credential(CredHost)
		if err != nil {
			return "", "", fmt.Errorf("host id: %w", err)
		}
		id := strings.TrimSpace(string(v))
		clear(v)
		if !hostIDRE.MatchString(id) {
			return "", "", fmt.Errorf("host id: credential %s is not a valid host id", CredHost)
		}
		return id, "credential " + CredHost, nil
	default:
		return source, "configuration", nil
	}
}

// Token resolves key.token. The SMBIOS credential is preferred by design:
// it is neither on the disk nor in /proc/cmdline. It returns the token
// bytes (the caller wipes them), where they came from, and warnings to
// print. An empty source with no command-line token means no token.
func (s Sources) Token(source string) (tok []byte, from string, warnings []string, err error) {
	if s.CmdlineToken != "" {
		return []byte(s.CmdlineToken), "rd.unlockrd.token", nil, nil
	}
	switch {
	case source == "":
		return nil, "none", nil, nil
	case source == "credential":
		v, err := s.Credential(CredToken)
		if err != nil {
			return nil, "", nil, fmt.Errorf("token: %w", err)
		}
		return v, "credential " + CredToken, nil, nil
	case source == "cmdline":
		return nil, "", nil, errors.New("token: key.token is cmdline but rd.unlockrd.token= is not on the kernel command line")
	case strings.HasPrefix(source, "file:"):
		p := filepath.Join(s.fileRoot(), strings.TrimPrefix(source, "file:"))
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, "", nil, fmt.Errorf("token file: %w", err)
		}
		t := bytes.TrimSpace(b)
		out := append([]byte(nil), t...)
		clear(b)
		if len(out) == 0 {
			return nil, "", nil, fmt.Errorf("token file %s is empty", source)
		}
		return out, source, []string{"the token comes from a file in the image, which sits on the unencrypted boot medium; prefer an SMBIOS credential"}, nil
	}
	return nil, "", nil, fmt.Errorf("token: unknown source %q", source)
}

// ErrNoCredential is returned when no SMBIOS credential has the name.
var ErrNoCredential = errors.New("no such SMBIOS credential")

// Credential returns the value of an SMBIOS type 11 (OEM strings)
// credential: "io.systemd.credential:NAME=VALUE" or
// "io.systemd.credential.binary:NAME=BASE64". A malformed entry is an error
// naming the credential, so that the caller can say so and try other
// sources.
func (s Sources) Credential(name string) ([]byte, error) {
	dir := filepath.Join(s.sysRoot(), "sys/firmware/dmi/entries")
	ents, err := filepath.Glob(filepath.Join(dir, "11-*", "raw"))
	if err != nil {
		return nil, err
	}
	sort.Strings(ents)
	for _, p := range ents {
		raw, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, str := range oemStrings(raw) {
			if v, ok := bytes.CutPrefix(str, []byte("io.systemd.credential:"+name+"=")); ok {
				out := append([]byte(nil), v...)
				clear(raw)
				return out, nil
			}
			if v, ok := bytes.CutPrefix(str, []byte("io.systemd.credential.binary:"+name+"=")); ok {
				out := make([]byte, base64.StdEncoding.DecodedLen(len(v)))
				n, err := base64.StdEncoding.Decode(out, v)
				clear(raw)
				if err != nil {
					clear(out)
					return nil, fmt.Errorf("SMBIOS credential %s: binary value is not base64", name)
				}
				return out[:n], nil
			}
		}
		clear(raw)
	}
	return nil, fmt.Errorf("%w %q", ErrNoCredential, name)
}

// oemStrings returns the string set of one SMBIOS structure: after the
// formatted area (whose length is byte 1), NUL-terminated strings ending
// with an empty one.
func oemStrings(raw []byte) [][]byte {
	if len(raw) < 4 || int(raw[1]) > len(raw) {
		return nil
	}
	var out [][]byte
	rest := raw[raw[1]:]
	for len(rest) > 0 {
		i := bytes.IndexByte(rest, 0)
		if i <= 0 {
			break
		}
		out = append(out, rest[:i])
		rest = rest[i+1:]
	}
	return out
}

func (s Sources) sysRoot() string {
	if s.SysRoot == "" {
		return "/"
	}
	return s.SysRoot
}

func (s Sources) fileRoot() string {
	if s.FileRoot == "" {
		return "/"
	}
	return s.FileRoot
}
