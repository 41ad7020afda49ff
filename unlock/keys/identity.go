package keys

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// Sources locates the host's identity and credentials. The zero value reads
// the real system; tests point the paths at fixtures.
//
// Resolution order (key.host and key.token name the source to use):
// the configured source is tried first; if it is absent or malformed, the
// problem is reported by name and the other automatic sources are tried,
// in this order:
//
//	key.host:  configured source, then rd.unlockrd.host=, the credential
//	           unlockrd.host, the SMBIOS system UUID (a literal id is final)
//	key.token: configured source, then the credential unlockrd.token,
//	           rd.unlockrd.token= (unset key.token: either, or no token)
//
// So an image built for SMBIOS credentials still boots a host whose
// credential was mangled in transit when the operator adds the value to
// the kernel command line, and says why it did. A command-line value that
// is present but not used is reported too, so that nobody wonders which
// one counted. The credential comes first among the token fallbacks
// because it is neither on the disk nor in /proc/cmdline.
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

// Source names as they appear in messages.
const (
	srcCmdlineHost  = "rd.unlockrd.host="
	srcCmdlineToken = "rd.unlockrd.token="
	srcUUID         = "the SMBIOS system UUID"
	srcCredHost     = "SMBIOS credential " + CredHost
	srcCredToken    = "SMBIOS credential " + CredToken
)

// errAbsent marks a source that is simply not there (as opposed to
// present but malformed).
var errAbsent = errors.New("not present")

// HostID resolves key.host (smbios-uuid, cmdline, credential or a literal
// id; the zero value is smbios-uuid). It returns the id, the source it came
// from, and notes to print (fallbacks taken, values ignored).
func (s Sources) HostID(source config.HostSource) (id, from string, notes []string, err error) {
	var first string
	switch source.From {
	case config.SourceLiteral:
		if s.CmdlineHost != "" && s.CmdlineHost != source.ID {
			notes = append(notes, fmt.Sprintf("%s ignored: key.host names the host (%s)", srcCmdlineHost, source.ID))
		}
		return source.ID, "configuration", notes, nil
	case config.SourceCmdline:
		first = srcCmdlineHost
	case config.SourceCredential:
		first = srcCredHost
	case config.SourceSMBIOSUUID, config.SourceNone:
		first = srcUUID
	default:
		return "", "", nil, fmt.Errorf("host id: key.host cannot be %s", source)
	}
	order := []string{first}
	for _, o := range []string{srcCmdlineHost, srcCredHost, srcUUID} {
		if o != first {
			order = append(order, o)
		}
	}
	var failed []string
	for i, src := range order {
		v, err := s.hostFrom(src)
		if err != nil {
			// Absent fallbacks are unremarkable; the configured source
			// being absent, or any source being malformed, is not.
			if i == 0 || !errors.Is(err, errAbsent) {
				failed = append(failed, fmt.Sprintf("%s: %v", src, err))
			}
			continue
		}
		if len(failed) > 0 {
			notes = append(notes, fmt.Sprintf("host id: %s; using %s instead", strings.Join(failed, "; "), src))
		}
		if src != srcCmdlineHost && s.CmdlineHost != "" && s.CmdlineHost != v {
			notes = append(notes, fmt.Sprintf("%s ignored: the host id comes from %s (key.host: %s)", srcCmdlineHost, src, source))
		}
		return v, src, notes, nil
	}
	return "", "", nil, fmt.Errorf("host id: no source gave one (%s)", strings.Join(failed, "; "))
}

func (s Sources) hostFrom(src string) (string, error) {
	switch src {
	case srcCmdlineHost:
		if s.CmdlineHost == "" {
			return "", fmt.Errorf("%w on the kernel command line", errAbsent)
		}
		if !keyproto.ValidHostID(s.CmdlineHost) {
			return "", errors.New("malformed (not a valid host id)")
		}
		return s.CmdlineHost, nil
	case srcCredHost:
		v, err := s.Credential(CredHost)
		if err != nil {
			return "", err
		}
		id := strings.TrimSpace(string(v))
		clear(v)
		if !keyproto.ValidHostID(id) {
			return "", errors.New("malformed (not a valid host id: letters, digits, . _ -, at most 128)")
		}
		return id, nil
	case srcUUID:
		p := filepath.Join(s.sysRoot(), "sys/class/dmi/id/product_uuid")
		b, err := os.ReadFile(p)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return "", fmt.Errorf("%w (no %s)", errAbsent, p)
			}
			return "", err
		}
		id := strings.ToLower(strings.TrimSpace(string(b)))
		if !keyproto.ValidHostID(id) {
			return "", fmt.Errorf("%s holds no usable UUID", p)
		}
		// SMBIOS: all zeros means "not set", all ones "not present";
		// either would give every such machine the same id.
		if strings.Trim(id, "0-") == "" || strings.Trim(id, "f-") == "" {
			return "", fmt.Errorf("%w (the firmware left it unset: %s)", errAbsent, id)
		}
		return id, nil
	}
	return "", fmt.Errorf("unknown source %q", src)
}

// Token resolves key.token (credential, cmdline, file:PATH, or the zero
// value for none configured). It returns the token bytes (the caller wipes
// them), where they came from, and notes to print (warnings, fallbacks
// taken, values ignored). With no source configured and none present, it
// returns no token and no error.
func (s Sources) Token(source config.TokenSource) (tok []byte, from string, notes []string, err error) {
	var order []string
	unset := source.From == config.SourceNone
	switch source.From {
	case config.SourceNone, config.SourceCredential:
		order = []string{srcCredToken, srcCmdlineToken}
	case config.SourceCmdline:
		order = []string{srcCmdlineToken, srcCredToken}
	case config.SourceFile:
		order = []string{source.String(), srcCredToken, srcCmdlineToken}
	default:
		return nil, "", nil, fmt.Errorf("token: key.token cannot be %s", source)
	}
	var failed []string
	for i, src := range order {
		t, err := s.tokenFrom(src)
		if err != nil {
			if (i == 0 && !unset) || !errors.Is(err, errAbsent) {
				failed = append(failed, fmt.Sprintf("%s: %v", src, err))
			}
			continue
		}
		if len(failed) > 0 {
			notes = append(notes, fmt.Sprintf("token: %s; using %s instead", strings.Join(failed, "; "), src))
		}
		if src != srcCmdlineToken && s.CmdlineToken != "" {
			notes = append(notes, fmt.Sprintf("%s ignored: the token comes from %s", srcCmdlineToken, src))
		}
		if strings.HasPrefix(src, "file:") {
			notes = append(notes, "warning: the token comes from a file in the image, which sits on the unencrypted boot medium; prefer an SMBIOS credential")
		}
		return t, src, notes, nil
	}
	if unset && len(failed) == 0 {
		return nil, "none", nil, nil
	}
	if unset {
		// Something was there but malformed: say so, and go on without.
		return nil, "none", []string{fmt.Sprintf("token: %s; sending no token", strings.Join(failed, "; "))}, nil
	}
	return nil, "", nil, fmt.Errorf("token: no source gave one (%s)", strings.Join(failed, "; "))
}

func (s Sources) tokenFrom(src string) ([]byte, error) {
	var t []byte
	switch {
	case src == srcCmdlineToken:
		if s.CmdlineToken == "" {
			return nil, fmt.Errorf("%w on the kernel command line", errAbsent)
		}
		t = []byte(s.CmdlineToken)
	case src == srcCredToken:
		v, err := s.Credential(CredToken)
		if err != nil {
			return nil, err
		}
		t = v
	case strings.HasPrefix(src, "file:"):
		p := filepath.Join(s.fileRoot(), strings.TrimPrefix(src, "file:"))
		b, err := os.ReadFile(p)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("%w in the image", errAbsent)
			}
			return nil, errors.New("unreadable")
		}
		t = append([]byte(nil), bytes.TrimSpace(b)...)
		clear(b)
	default:
		return nil, fmt.Errorf("unknown source %q", src)
	}
	if err := checkToken(t); err != nil {
		clear(t)
		return nil, err
	}
	return t, nil
}

// maxToken bounds a token (the reference server reads at most 512 bytes).
const maxToken = 512

// checkToken accepts an RFC 6750 bearer token: it goes into an HTTP
// header, so a stray CR or LF would inject headers. The error describes
// the problem without quoting the secret.
func checkToken(t []byte) error {
	if len(t) == 0 {
		return errors.New("malformed (empty)")
	}
	if len(t) > maxToken {
		return fmt.Errorf("malformed (%d bytes, at most %d)", len(t), maxToken)
	}
	pad := false
	for i, c := range t {
		ok := 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' ||
			c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/'
		switch {
		case c == '=' && i > 0:
			pad = true
		case ok && !pad:
		default:
			return fmt.Errorf("malformed (byte %d of %d is not allowed in a bearer token)", i+1, len(t))
		}
	}
	return nil
}

// ErrNoCredential is returned when no SMBIOS credential has the name.
var ErrNoCredential = fmt.Errorf("%w", errAbsent)

// Credential returns the value of an SMBIOS type 11 (OEM strings)
// credential: "io.systemd.credential:NAME=VALUE" or
// "io.systemd.credential.binary:NAME=BASE64". The first entry with the
// name counts. A malformed entry is an error that does not quote the
// value, so that the caller can report it and try other sources.
func (s Sources) Credential(name string) ([]byte, error) {
	dir := filepath.Join(s.sysRoot(), "sys/firmware/dmi/entries")
	ents, err := filepath.Glob(filepath.Join(dir, "11-*", "raw"))
	if err != nil {
		return nil, err
	}
	// 11-2 before 11-10: the structures' order in the table.
	slices.SortFunc(ents, func(a, b string) int { return entryIndex(a) - entryIndex(b) })
	for _, p := range ents {
		raw, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		v, found, err := credentialIn(raw, name)
		clear(raw)
		if found {
			return v, err
		}
	}
	return nil, ErrNoCredential
}

// credentialIn looks for the credential in one raw SMBIOS type 11
// structure.
func credentialIn(raw []byte, name string) (v []byte, found bool, err error) {
	for _, str := range oemStrings(raw) {
		if v, ok := bytes.CutPrefix(str, []byte("io.systemd.credential:"+name+"=")); ok {
			return append([]byte(nil), v...), true, nil
		}
		if v, ok := bytes.CutPrefix(str, []byte("io.systemd.credential.binary:"+name+"=")); ok {
			out, err := decodeBase64(v)
			if err != nil {
				return nil, true, errors.New("malformed (the binary form's value is not base64)")
			}
			return out, true, nil
		}
	}
	return nil, false, nil
}

// decodeBase64 decodes standard base64, padded or not, into a slice that
// holds nothing beyond the value.
func decodeBase64(v []byte) ([]byte, error) {
	enc := base64.StdEncoding
	if len(v)%4 != 0 {
		enc = base64.RawStdEncoding
	}
	out := make([]byte, enc.DecodedLen(len(v)))
	n, err := enc.Decode(out, v)
	if err != nil {
		clear(out)
		return nil, err
	}
	clear(out[n:])
	return out[:n:n], nil
}

// entryIndex is N in .../11-N/raw.
func entryIndex(p string) int {
	d := filepath.Base(filepath.Dir(p))
	n, _ := strconv.Atoi(strings.TrimPrefix(d, "11-"))
	return n
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
