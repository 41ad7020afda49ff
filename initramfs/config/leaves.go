package config

import (
	"encoding/json"
	"fmt"
	"path"
	"strings"

	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// The leaves below are parsed once, when the configuration is read (YAML
// by the builder, JSON by the init, the kernel command line at boot), so
// that no stage parses a source word or an ip= value again. Each is
// written back as the same string the user wrote, so images stay
// compatible both ways.

// Source is where key.host or key.token comes from.
type Source uint8

// The sources. Not every one applies to both fields: SourceSMBIOSUUID and
// SourceLiteral are host-only, SourceFile and SourceNone token-only.
const (
	// SourceNone is an unset key.token: a token is sent only when a
	// credential or the command line offers one.
	SourceNone Source = iota
	SourceSMBIOSUUID
	SourceCmdline
	SourceCredential
	// SourceFile is file:PATH, a token file inside the image.
	SourceFile
	// SourceLiteral is a host id written in the configuration itself.
	SourceLiteral
)

// HostSource is key.host: smbios-uuid (the default), cmdline, credential
// or a literal host id.
type HostSource struct {
	From Source
	ID   string // the host id, for SourceLiteral
}

// String is the configuration word.
func (h HostSource) String() string {
	switch h.From {
	case SourceCmdline:
		return "cmdline"
	case SourceCredential:
		return "credential"
	case SourceLiteral:
		return h.ID
	}
	return "smbios-uuid"
}

// ParseHostSource reads a key.host word.
func ParseHostSource(s string) (HostSource, error) {
	switch s {
	case "smbios-uuid":
		return HostSource{From: SourceSMBIOSUUID}, nil
	case "cmdline":
		return HostSource{From: SourceCmdline}, nil
	case "credential":
		return HostSource{From: SourceCredential}, nil
	}
	if !keyproto.ValidHostID(s) {
		return HostSource{}, fmt.Errorf("%q: want smbios-uuid, cmdline, credential or a literal host id (letters, digits, . _ -)", s)
	}
	return HostSource{From: SourceLiteral, ID: s}, nil
}

// MarshalText writes the configuration word.
func (h HostSource) MarshalText() ([]byte, error) { return []byte(h.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (h *HostSource) UnmarshalText(b []byte) error {
	v, err := ParseHostSource(string(b))
	if err != nil {
		return err
	}
	*h = v
	return nil
}

// TokenSource is key.token: unset, credential, cmdline or file:PATH. A
// literal token is refused: it would sit on the unencrypted boot medium.
type TokenSource struct {
	From Source
	Path string // absolute path inside the image, for SourceFile
}

// String is the configuration word ("" when unset).
func (t TokenSource) String() string {
	switch t.From {
	case SourceCmdline:
		return "cmdline"
	case SourceCredential:
		return "credential"
	case SourceFile:
		return "file:" + t.Path
	}
	return ""
}

// ParseTokenSource reads a key.token word ("" for unset).
func ParseTokenSource(s string) (TokenSource, error) {
	switch s {
	case "":
		return TokenSource{}, nil
	case "cmdline":
		return TokenSource{From: SourceCmdline}, nil
	case "credential":
		return TokenSource{From: SourceCredential}, nil
	}
	if p, ok := strings.CutPrefix(s, "file:"); ok {
		if !path.IsAbs(p) {
			return TokenSource{}, fmt.Errorf("file:%s must be an absolute path inside the image", p)
		}
		return TokenSource{From: SourceFile, Path: p}, nil
	}
	// The value is not quoted: it may be the token itself.
	return TokenSource{}, fmt.Errorf("want credential, cmdline or file:PATH (a literal token would sit on the unencrypted boot medium)")
}

// MarshalText writes the configuration word.
func (t TokenSource) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (t *TokenSource) UnmarshalText(b []byte) error {
	v, err := ParseTokenSource(string(b))
	if err != nil {
		return err
	}
	*t = v
	return nil
}

// IPPlan is network.ip: the ip= values as written and the plan they parse
// to (package ipconf, the parser the initramfs runs, so an image never
// carries an ip= it would have to fall back from).
type IPPlan struct {
	// Values are the ip= values as written; they are what is encoded.
	Values []string
	Plan   ipconf.Plan
}

// ParseIPPlan parses ip= values together (values fine alone may
// contradict each other); none means "dhcp".
func ParseIPPlan(values []string) (IPPlan, error) {
	if len(values) == 0 {
		values = []string{DefaultIP}
	}
	p, err := ipconf.Parse(values)
	if err != nil {
		return IPPlan{}, err
	}
	return IPPlan{Values: values, Plan: p}, nil
}

// MarshalJSON writes the values as a list.
func (p IPPlan) MarshalJSON() ([]byte, error) { return json.Marshal(p.Values) }

// UnmarshalJSON reads a list of values (or one string) and parses it.
func (p *IPPlan) UnmarshalJSON(b []byte) error {
	var vs []string
	if err := json.Unmarshal(b, &vs); err != nil {
		var one string
		if json.Unmarshal(b, &one) != nil {
			return fmt.Errorf("network.ip: want a string or a list of strings")
		}
		vs = []string{one}
	}
	v, err := ParseIPPlan(vs)
	if err != nil {
		return fmt.Errorf("network.ip: %w", err)
	}
	*p = v
	return nil
}

// IsZero reports an unset network.ip (omitted when encoded).
func (p IPPlan) IsZero() bool { return len(p.Values) == 0 }
