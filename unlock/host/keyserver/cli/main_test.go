package cli_test

import (
	"bytes"
	"context"
	"io"
	"testing"

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
