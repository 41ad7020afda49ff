package keys

import (
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/initramfs/config"
)

// sysFixture lays out the /sys files the identity code reads.
type sysFixture struct {
	root string
}

func newSys(t *testing.T) *sysFixture {
	return &sysFixture{root: t.TempDir()}
}

func (f *sysFixture) write(t *testing.T, rel string, b []byte) {
	t.Helper()
	p := filepath.Join(f.root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func (f *sysFixture) uuid(t *testing.T, s string) {
	f.write(t, "sys/class/dmi/id/product_uuid", []byte(s+"\n"))
}

// oem writes SMBIOS type 11 structure number n holding the strings, laid
// out as the kernel's dmi-sysfs exposes it: a 5-byte formatted area
// (type, length, handle, count), then NUL-terminated strings and a NUL.
func (f *sysFixture) oem(t *testing.T, n int, strs ...string) {
	raw := []byte{11, 5, byte(n), 0, byte(len(strs))}
	for _, s := range strs {
		raw = append(raw, s...)
		raw = append(raw, 0)
	}
	raw = append(raw, 0)
	f.write(t, fmt.Sprintf("sys/firmware/dmi/entries/11-%d/raw", n), raw)
}

const tok = "dGhlLXRva2VuLXZhbHVl_-x"

func cred(name, v string) string { return "io.systemd.credential:" + name + "=" + v }
func credBin(name, v string) string {
	return "io.systemd.credential.binary:" + name + "=" + base64.StdEncoding.EncodeToString([]byte(v))
}

// noTokenIn checks that no note or error quotes a token value.
func noTokenIn(t *testing.T, secrets []string, notes []string, err error) {
	t.Helper()
	all := strings.Join(notes, "\n")
	if err != nil {
		all += "\n" + err.Error()
	}
	for _, s := range secrets {
		if s != "" && strings.Contains(all, s) {
			t.Fatalf("token %q leaked into notes or error:\n%s", s, all)
		}
	}
}

func TestTokenSources(t *testing.T) {
	bad := "tok\r\nX-Injected: 1"
	for _, tc := range []struct {
		name    string
		source  string
		setup   func(*testing.T, *sysFixture)
		cmdline string
		want    string // token, or "" for none
		from    string
		notes   []string // substrings, one per note
		err     string
	}{
		{name: "credential", source: "credential", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, "vendor junk", cred(CredToken, tok)) },
			want: tok, from: "SMBIOS credential unlockrd.token"},
		{name: "binary credential", source: "credential", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, credBin(CredToken, tok)) },
			want: tok, from: "SMBIOS credential unlockrd.token"},
		{name: "binary credential, unpadded", source: "credential", setup: func(t *testing.T, f *sysFixture) {
			f.oem(t, 0, strings.TrimRight(credBin(CredToken, tok+"ab"), "="))
		}, want: tok + "ab", from: "SMBIOS credential unlockrd.token"},
		{name: "credential in a later structure", source: "credential", setup: func(t *testing.T, f *sysFixture) {
			f.oem(t, 0, "other")
			f.oem(t, 2, cred(CredToken, tok))
			f.oem(t, 10, cred(CredToken, "later-one"))
		}, want: tok, from: "SMBIOS credential unlockrd.token"},
		{name: "credential preferred over the command line", source: "credential", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, tok)) },
			cmdline: "cmdline-token", want: tok, from: "SMBIOS credential unlockrd.token",
			notes: []string{"rd.unlockrd.token= ignored: the token comes from SMBIOS credential unlockrd.token"}},
		{name: "malformed binary credential falls back to the command line", source: "credential", setup: func(t *testing.T, f *sysFixture) {
			f.oem(t, 0, "io.systemd.credential.binary:"+CredToken+"=!!"+tok)
		}, cmdline: "cmdline-token", want: "cmdline-token", from: "rd.unlockrd.token=",
			notes: []string{"token: SMBIOS credential unlockrd.token: malformed (the binary form's value is not base64); using rd.unlockrd.token= instead"}},
		{name: "credential with a header injection", source: "credential", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, bad)) },
			cmdline: "cmdline-token", want: "cmdline-token", from: "rd.unlockrd.token=",
			notes: []string{"SMBIOS credential unlockrd.token: malformed (byte 4 of 18 is not allowed in a bearer token); using rd.unlockrd.token= instead"}},
		{name: "absent credential falls back to the command line", source: "credential", cmdline: "cmdline-token", want: "cmdline-token", from: "rd.unlockrd.token=",
			notes: []string{"token: SMBIOS credential unlockrd.token: not present; using rd.unlockrd.token= instead"}},
		{name: "neither", source: "credential",
			err: "token: no source gave one (SMBIOS credential unlockrd.token: not present)"},
		{name: "malformed and nothing else", source: "credential", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, "")) },
			err: "token: no source gave one (SMBIOS credential unlockrd.token: malformed (empty))"},
		{name: "cmdline", source: "cmdline", cmdline: "cmdline-token", want: "cmdline-token", from: "rd.unlockrd.token="},
		{name: "cmdline absent falls back to the credential", source: "cmdline", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, tok)) },
			want: tok, from: "SMBIOS credential unlockrd.token",
			notes: []string{"token: rd.unlockrd.token=: not present on the kernel command line; using SMBIOS credential unlockrd.token instead"}},
		{name: "file", source: "file:/etc/unlockrd/token", setup: func(t *testing.T, f *sysFixture) { f.write(t, "etc/unlockrd/token", []byte(tok+"\n")) },
			want: tok, from: "file:/etc/unlockrd/token", notes: []string{"warning: the token comes from a file in the image"}},
		{name: "file absent falls back to the credential", source: "file:/etc/unlockrd/token", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, tok)) },
			want: tok, from: "SMBIOS credential unlockrd.token",
			notes: []string{"token: file:/etc/unlockrd/token: not present in the image; using SMBIOS credential unlockrd.token instead"}},
		{name: "empty file", source: "file:/t", setup: func(t *testing.T, f *sysFixture) { f.write(t, "t", []byte("\n")) },
			err: "token: no source gave one (file:/t: malformed (empty))"},
		{name: "unset, nothing there", source: "", from: "none"},
		{name: "unset, credential there", source: "", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, tok)) },
			want: tok, from: "SMBIOS credential unlockrd.token"},
		{name: "unset, malformed credential", source: "", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, bad)) },
			from: "none", notes: []string{"token: SMBIOS credential unlockrd.token: malformed (byte 4 of 18 is not allowed in a bearer token); sending no token"}},
		{name: "too long", source: "credential", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, cred(CredToken, strings.Repeat("a", 513))) },
			err: "malformed (513 bytes, at most 512)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newSys(t)
			if tc.setup != nil {
				tc.setup(t, f)
			}
			src := Sources{SysRoot: f.root, FileRoot: f.root, CmdlineToken: tc.cmdline}
			ts, err := config.ParseTokenSource(tc.source)
			if err != nil {
				t.Fatal(err)
			}
			got, from, notes, err := src.Token(ts)
			noTokenIn(t, []string{tok, bad, "cmdline-token", base64.StdEncoding.EncodeToString([]byte(tok))}, notes, err)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want || from != tc.from {
				t.Fatalf("token %q from %q, want %q from %q", got, from, tc.want, tc.from)
			}
			if len(notes) != len(tc.notes) {
				t.Fatalf("notes %q, want %d", notes, len(tc.notes))
			}
			for i, n := range tc.notes {
				if !strings.Contains(notes[i], n) {
					t.Fatalf("note %q, want it to contain %q", notes[i], n)
				}
			}
		})
	}
}

func TestHostSources(t *testing.T) {
	const u = "3CF13FF2-1B7B-4F3A-9C1E-0123456789AB"
	lower := strings.ToLower(u)
	for _, tc := range []struct {
		name    string
		source  string
		setup   func(*testing.T, *sysFixture)
		cmdline string
		want    string
		from    string
		notes   []string
		err     string
	}{
		{name: "smbios uuid", source: "smbios-uuid", setup: func(t *testing.T, f *sysFixture) { f.uuid(t, u) }, want: lower, from: srcUUID},
		{name: "default is the uuid", source: "", setup: func(t *testing.T, f *sysFixture) { f.uuid(t, u) }, want: lower, from: srcUUID},
		{name: "uuid preferred, command line noted", source: "smbios-uuid", setup: func(t *testing.T, f *sysFixture) { f.uuid(t, u) }, cmdline: "vm-7",
			want: lower, from: srcUUID, notes: []string{"rd.unlockrd.host= ignored: the host id comes from the SMBIOS system UUID (key.host: smbios-uuid)"}},
		{name: "unset uuid falls back to the command line", source: "smbios-uuid", setup: func(t *testing.T, f *sysFixture) { f.uuid(t, "00000000-0000-0000-0000-000000000000") },
			cmdline: "vm-7", want: "vm-7", from: srcCmdlineHost,
			notes: []string{"host id: the SMBIOS system UUID: not present (the firmware left it unset: 00000000-0000-0000-0000-000000000000); using rd.unlockrd.host= instead"}},
		{name: "all-ones uuid is unset too", source: "smbios-uuid", setup: func(t *testing.T, f *sysFixture) { f.uuid(t, "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF") },
			err: "the firmware left it unset"},
		{name: "cmdline", source: "cmdline", cmdline: "vm-7", want: "vm-7", from: srcCmdlineHost},
		{name: "cmdline absent falls back to the credential", source: "cmdline", setup: func(t *testing.T, f *sysFixture) {
			f.uuid(t, u)
			f.oem(t, 0, cred(CredHost, "db-42\n"))
		}, want: "db-42", from: srcCredHost,
			notes: []string{"host id: rd.unlockrd.host=: not present on the kernel command line; using SMBIOS credential unlockrd.host instead"}},
		{name: "credential", source: "credential", setup: func(t *testing.T, f *sysFixture) { f.oem(t, 0, credBin(CredHost, "db-42")) }, want: "db-42", from: srcCredHost},
		{name: "malformed credential falls back to the uuid", source: "credential", setup: func(t *testing.T, f *sysFixture) {
			f.uuid(t, u)
			f.oem(t, 0, cred(CredHost, "../../etc"))
		}, want: lower, from: srcUUID,
			notes: []string{"host id: SMBIOS credential unlockrd.host: malformed (not a valid host id: letters, digits, . _ -, at most 128); using the SMBIOS system UUID instead"}},
		{name: "malformed fallback is reported too", source: "cmdline", setup: func(t *testing.T, f *sysFixture) {
			f.uuid(t, u)
			f.oem(t, 0, "io.systemd.credential.binary:"+CredHost+"=***")
		}, want: lower, from: srcUUID,
			notes: []string{"host id: rd.unlockrd.host=: not present on the kernel command line; SMBIOS credential unlockrd.host: malformed (the binary form's value is not base64); using the SMBIOS system UUID instead"}},
		{name: "literal", source: "pg-primary-3", cmdline: "vm-7", want: "pg-primary-3", from: "configuration",
			notes: []string{"rd.unlockrd.host= ignored: key.host names the host (pg-primary-3)"}},
		{name: "nothing", source: "smbios-uuid",
			err: "host id: no source gave one (the SMBIOS system UUID: not present (no "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newSys(t)
			if tc.setup != nil {
				tc.setup(t, f)
			}
			var hs config.HostSource // "" is the zero value: smbios-uuid
			if tc.source != "" {
				var err error
				if hs, err = config.ParseHostSource(tc.source); err != nil {
					t.Fatal(err)
				}
			}
			got, from, notes, err := Sources{SysRoot: f.root, CmdlineHost: tc.cmdline}.HostID(hs)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want || from != tc.from {
				t.Fatalf("host %q from %q, want %q from %q", got, from, tc.want, tc.from)
			}
			if len(notes) != len(tc.notes) {
				t.Fatalf("notes %q, want %d", notes, len(tc.notes))
			}
			for i, n := range tc.notes {
				if !strings.Contains(notes[i], n) {
					t.Fatalf("note %q, want it to contain %q", notes[i], n)
				}
			}
		})
	}
}

func TestCredentialAbsentIsErrNoCredential(t *testing.T) {
	f := newSys(t)
	f.oem(t, 0, cred("other", "x"))
	if _, err := (Sources{SysRoot: f.root}).Credential(CredToken); !errors.Is(err, ErrNoCredential) {
		t.Fatalf("err = %v", err)
	}
}

func TestOEMStringsMalformed(t *testing.T) {
	for _, raw := range [][]byte{nil, {11}, {11, 200, 0, 0, 1, 'a', 0}, {11, 5, 0, 0, 1, 'a'}, {11, 4, 0, 0}} {
		_ = oemStrings(raw) // must not panic
	}
	if got := oemStrings([]byte{11, 5, 0, 0, 2, 'a', 0, 'b', 'c', 0, 0}); len(got) != 2 || string(got[1]) != "bc" {
		t.Fatalf("oemStrings = %q", got)
	}
}
