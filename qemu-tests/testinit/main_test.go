package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
	"golang.org/x/sys/unix"
)

func TestStructSizes(t *testing.T) {
	if n := binary.Size(unix.DmIoctl{}); n != dmHeaderSize {
		t.Errorf("struct dm_ioctl encodes to %d bytes", n)
	}
	if n := binary.Size(unix.DmTargetSpec{}); n != dmSpecSize {
		t.Errorf("struct dm_target_spec encodes to %d bytes", n)
	}
}

func TestHideKey(t *testing.T) {
	in := "aes-xts-plain64 0123abcd 0 254:2 8192 2 no_read_workqueue no_write_workqueue"
	want := "aes-xts-plain64 <key> 0 254:2 8192 2 no_read_workqueue no_write_workqueue"
	if got := hideKey("crypt", in); got != want {
		t.Errorf("hideKey = %q", got)
	}
	if got := hideKey("linear", "254:2 0"); got != "254:2 0" {
		t.Errorf("linear changed: %q", got)
	}
	if got := hideKey("crypt", "aes-xts-plain64 :64:logon:cryptsetup:x 0 254:2 0"); strings.Contains(got, "logon") {
		t.Errorf("keyring key shown: %q", got)
	}
}

func TestCryptParams(t *testing.T) {
	c := initcfg.Crypt{Name: "d", Device: "/dev/vda2", Key: "00ff", Offset: 8192, SectorSize: 4096, Flags: []string{"no_read_workqueue"}}
	if got, want := cryptParams(c), "aes-xts-plain64 00ff 0 /dev/vda2 8192 2 no_read_workqueue sector_size:4096"; got != want {
		t.Errorf("got %q want %q", got, want)
	}
	c = initcfg.Crypt{Device: "/dev/vdb", Key: "aa", Cipher: "aes-cbc-essiv:sha256", IVOffset: 3}
	if got, want := cryptParams(c), "aes-cbc-essiv:sha256 aa 3 /dev/vdb 0"; got != want {
		t.Errorf("got %q want %q", got, want)
	}
}

// TestParseTargets builds a DM_TABLE_STATUS reply by hand: two targets,
// next offsets relative to data_start.
func TestParseTargets(t *testing.T) {
	h := dmHeader("x", 0, 0)
	h.Target_count = 2
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, &h)
	t1 := targetPayload(0, 100, "linear", "254:1 0")
	t2 := targetPayload(100, 50, "crypt", "aes-xts-plain64 k 0 254:2 0")
	spec := unix.DmTargetSpec{}
	binary.Read(bytes.NewReader(t1[:dmSpecSize]), binary.LittleEndian, &spec)
	if int(spec.Next) != len(t1) || len(t1)%8 != 0 {
		t.Fatalf("next %d, payload %d", spec.Next, len(t1))
	}
	// In a status reply next counts from data_start: for the first
	// target that is what DM_TABLE_LOAD uses too, the second's must grow.
	binary.LittleEndian.PutUint32(t2[20:], uint32(len(t1)+len(t2)))
	b.Write(t1)
	b.Write(t2)
	ts, err := parseTargets(b.Bytes(), h)
	if err != nil {
		t.Fatal(err)
	}
	if len(ts) != 2 || ts[0] != (dmTarget{0, 100, "linear", "254:1 0"}) || ts[1] != (dmTarget{100, 50, "crypt", "aes-xts-plain64 k 0 254:2 0"}) {
		t.Errorf("targets %+v", ts)
	}
	h.Target_count = 3
	if _, err := parseTargets(b.Bytes(), h); err == nil {
		t.Error("a target beyond the buffer parsed")
	}
}

func TestHexIPv4(t *testing.T) {
	if got := hexIPv4("0202000A").String(); got != "10.0.2.2" {
		t.Errorf("got %s", got)
	}
	if got := hexIPv4("zz").String(); got != "0.0.0.0" {
		t.Errorf("got %s", got)
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.json")
	os.WriteFile(p, []byte(`{"files":["/a"],"nope":1}`), 0o644)
	if _, err := loadConfig(p); err == nil {
		t.Error("unknown field accepted")
	}
	if c, err := loadConfig(filepath.Join(dir, "missing")); err != nil || len(c.Files) != 0 {
		t.Errorf("missing config: %v %+v", err, c)
	}
}

// TestReportOnHost runs the report as a normal process (no setup, no
// power-off) and parses it with the harness, so the two agree on the
// line format.
func TestReportOnHost(t *testing.T) {
	dir := t.TempDir()
	text := filepath.Join(dir, "hello.txt")
	content := []byte("first line\x01\nsecond\n")
	os.WriteFile(text, content, 0o644)
	bin := filepath.Join(dir, "bin")
	os.WriteFile(bin, []byte("\x7fELF\x00\x01"), 0o644)
	cfg := filepath.Join(dir, "testinit.json")
	os.WriteFile(cfg, []byte(`{"files":["`+text+`","`+bin+`","/nonexistent"]}`), 0o644)
	t.Setenv("TESTINIT_CONFIG", cfg)

	var out bytes.Buffer
	run(&reporter{w: &out}, false)
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	for _, l := range lines {
		if !strings.HasPrefix(l, initcfg.Prefix) {
			t.Errorf("line without prefix: %q", l)
		}
	}
	if lines[len(lines)-1] != initcfg.Prefix+"done" {
		t.Errorf("last line %q", lines[len(lines)-1])
	}
	rep, err := harness.ParseReport(lines)
	if err != nil {
		t.Fatal(err)
	}
	if rep.PID != os.Getpid() || rep.Root == "" || rep.Root == "unknown" || len(rep.Mounts) == 0 || rep.Cmdline == "" {
		t.Errorf("report %+v", rep)
	}
	sum := sha256.Sum256(content)
	if f := rep.Files[text]; f.SHA256 != hex.EncodeToString(sum[:]) || f.Content != "first line?" {
		t.Errorf("text file %+v", f)
	}
	if !strings.Contains(out.String(), harness.FileLine(text, content)+"\n") {
		t.Errorf("harness.FileLine disagrees:\n%s", out.String())
	}
	if f := rep.Files[bin]; f.Content != "<binary>" {
		t.Errorf("binary file %+v", f)
	}
	if f := rep.Files["/nonexistent"]; !strings.Contains(f.Error, "no such file") {
		t.Errorf("missing file %+v", f)
	}
	if _, ok := rep.LinkAddrs("lo"); !ok {
		t.Errorf("no lo in %v", rep.Links)
	}
}

func TestPrintfKeepsLinesWhole(t *testing.T) {
	var out bytes.Buffer
	(&reporter{w: &out}).printf("a\nb\rc")
	if got := out.String(); got != "TESTINIT: a\\nb\\rc\n" {
		t.Errorf("got %q", got)
	}
}
