package cli_test

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

// TestAdminFlagErrors: the admin flags' mistakes are caught before
// anything starts, and name the flag or file.
func TestAdminFlagErrors(t *testing.T) {
	data := t.TempDir()
	missing := filepath.Join(t.TempDir(), "no-such-ca.pem")
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"serve", "--data", data, "--admin-listen", "127.0.0.1:0"}, 2, "--admin-ca"},
		{[]string{"serve", "--data", data, "--admin-allow-export"}, 2, "need --admin-listen"},
		{[]string{"serve", "--data", data, "--admin-listen", "127.0.0.1:0", "--admin-ca", "x", "--admin-cert", "c"}, 2, "--admin-cert and --admin-key"},
		{[]string{"serve", "--data", data, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--admin-ca", missing}, 1, missing},
		{[]string{"host", "list", "--data", data, "--cert", "c.pem"}, 2, "go with --server"},
		{[]string{"host", "list", "--server", "https://127.0.0.1:1", "--data", data}, 2, "--server and --data"},
		{[]string{"host", "list", "--server", "http://127.0.0.1:1", "--cert", "c", "--key", "k", "--ca", "a"}, 2, "want https://HOST:PORT"},
		{[]string{"host", "list", "--server", "https://127.0.0.1:1"}, 2, "--server needs --cert, --key"},
	} {
		var out, errb bytes.Buffer
		code := cliMain(t, c.args, &out, &errb)
		if code != c.code || !strings.Contains(errb.String(), c.want) {
			t.Errorf("%v: exit %d, %q; want %d mentioning %q", c.args, code, firstLine(errb.String()), c.code, c.want)
		}
	}
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
