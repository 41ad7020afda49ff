package cli_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/cli"
)

func cliMain(t *testing.T, args []string, stdout, stderr io.Writer) int {
	t.Helper()
	t.Setenv("UNLOCKRD_MASTER_KEY_FILE", "")
	return cli.Main(context.Background(), args, bytes.NewReader(nil), stdout, stderr)
}

func TestUsage(t *testing.T) {
	var out, errb bytes.Buffer
	if code := cliMain(t, nil, &out, &errb); code != 2 || !bytes.Contains(errb.Bytes(), []byte("usage:")) {
		t.Fatalf("no args: %d %s", code, errb.String())
	}
	errb.Reset()
	if code := cliMain(t, []string{"help"}, &out, &errb); code != 0 || !bytes.Contains(errb.Bytes(), []byte("host add")) {
		t.Fatalf("help: %d", code)
	}
	if code := cliMain(t, []string{"serve", "--bogus"}, &out, &errb); code != 2 {
		t.Fatalf("bad flag: %d", code)
	}
	if code := cliMain(t, []string{"pin"}, &out, &errb); code != 2 {
		t.Fatalf("pin without source: %d", code)
	}
}

// TestServeRefusesReadableTLSKey: serve does not start on a tls.key
// (or --key file) that group or others may read, and says how to fix it.
func TestServeRefusesReadableTLSKey(t *testing.T) {
	data := t.TempDir()
	var out, errb bytes.Buffer
	if code := cliMain(t, []string{"init", "--data", data}, &out, &errb); code != 0 {
		t.Fatalf("init: %d %s", code, errb.String())
	}
	key := filepath.Join(data, keyserver.TLSKeyFile)
	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, extra := range [][]string{nil, {"--cert", filepath.Join(data, keyserver.TLSCertFile), "--key", key}} {
		errb.Reset()
		args := append([]string{"serve", "--data", data, "--listen", "127.0.0.1:0"}, extra...)
		if code := cliMain(t, args, &out, &errb); code != 1 || !strings.Contains(errb.String(), "chmod 600") {
			t.Fatalf("%v: exit %d: %s", extra, code, errb.String())
		}
	}
}
