package harness

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sfdiskTable is `sfdisk --json` output.
type sfdiskTable struct {
	PartitionTable struct {
		Label      string `json:"label"`
		ID         string `json:"id"`
		Device     string `json:"device"`
		Unit       string `json:"unit"`
		FirstLBA   uint64 `json:"firstlba"`
		LastLBA    uint64 `json:"lastlba"`
		SectorSize int    `json:"sectorsize"`
		Partitions []struct {
			Node  string `json:"node"`
			Start uint64 `json:"start"`
			Size  uint64 `json:"size"`
			Type  string `json:"type"`
			UUID  string `json:"uuid"`
			Name  string `json:"name"`
		} `json:"partitions"`
	} `json:"partitiontable"`
}

func tool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := output(context.Background(), name, args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return string(out)
}

func sfdiskJSON(t *testing.T, path string) sfdiskTable {
	t.Helper()
	var tbl sfdiskTable
	if err := json.Unmarshal([]byte(tool(t, "sfdisk", "--json", path)), &tbl); err != nil {
		t.Fatalf("sfdisk --json: %v", err)
	}
	return tbl
}

func rawDisk() Disk {
	return Disk{
		GUID: "6A1B2C3D-4E5F-4A6B-8C7D-8E9FA0B1C2D3",
		Partitions: []Partition{
			{Name: "root", Size: 3 * mib, PartUUID: "11111111-2222-4333-8444-555555555555"},
			{Name: "data", Size: 2*mib + 1}, // rounded up to 3 MiB
			{Name: "swap", Size: mib, Swap: true, Raw: []byte("raw bytes")},
			{Name: "name-with-ünïcode-and-36-units-long", Size: mib, Type: "21686148-6449-6E6F-744E-656564454649"},
		},
	}
}

// TestGPTMatchesSfdisk checks the table against sfdisk's reading of it,
// and byte for byte against the table sfdisk writes for the same layout.
func TestGPTMatchesSfdisk(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := rawDisk()
	bd, err := d.Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := bd.Size, int64(10*mib); got != want {
		t.Errorf("disk size %d, want %d", got, want)
	}
	out := tool(t, "sfdisk", "--verify", bd.Path)
	if !strings.Contains(out, "No errors detected") {
		t.Errorf("sfdisk --verify: %s", out)
	}
	tbl := sfdiskJSON(t, bd.Path).PartitionTable
	if tbl.Label != "gpt" || tbl.ID != d.GUID || tbl.SectorSize != 512 {
		t.Errorf("sfdisk sees label %s id %s sector %d", tbl.Label, tbl.ID, tbl.SectorSize)
	}
	if tbl.FirstLBA != 34 || tbl.LastLBA != uint64(bd.Size/512-34) {
		t.Errorf("usable LBAs %d-%d", tbl.FirstLBA, tbl.LastLBA)
	}
	if len(tbl.Partitions) != len(d.Partitions) {
		t.Fatalf("sfdisk sees %d partitions, want %d", len(tbl.Partitions), len(d.Partitions))
	}
	wantStart := []uint64{2048, 2048 + 6144, 2048 + 12288, 2048 + 14336}
	wantSize := []uint64{6144, 6144, 2048, 2048}
	for i, sp := range tbl.Partitions {
		bp := bd.Partitions[i]
		if sp.Node != fmt.Sprintf("%s%d", bd.Path, i+1) || sp.Name != d.Partitions[i].Name ||
			sp.UUID != bp.PartUUID || sp.Type != bp.Type ||
			sp.Start != wantStart[i] || sp.Size != wantSize[i] ||
			uint64(bp.Offset) != sp.Start*512 || uint64(bp.Size) != sp.Size*512 {
			t.Errorf("partition %d: sfdisk %+v, built %+v", i+1, sp, *bp)
		}
	}
	if bd.Partitions[0].PartUUID != d.Partitions[0].PartUUID {
		t.Errorf("given PARTUUID not used: %s", bd.Partitions[0].PartUUID)
	}
	if bd.Partitions[2].Type != TypeLinuxSwap || bd.Partitions[1].Type != TypeLinuxFS {
		t.Errorf("types %s %s", bd.Partitions[1].Type, bd.Partitions[2].Type)
	}
	raw, err := bd.ReadPartition("swap")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(raw, []byte("raw bytes")) || len(raw) != mib || bytes.Count(raw, []byte{0}) != mib-9 {
		t.Errorf("raw partition content wrong")
	}

	// The same layout written by sfdisk must give the same table bytes.
	ref := filepath.Join(dir, "ref.img")
	if err := os.WriteFile(ref, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(ref, bd.Size); err != nil {
		t.Fatal(err)
	}
	var script strings.Builder
	fmt.Fprintf(&script, "label: gpt\nlabel-id: %s\nfirst-lba: 34\nunit: sectors\n", d.GUID)
	for i, bp := range bd.Partitions {
		fmt.Fprintf(&script, "start=%d, size=%d, type=%s, uuid=%s, name=\"%s\"\n",
			bp.Offset/512, bp.Size/512, bp.Type, bp.PartUUID, d.Partitions[i].Name)
	}
	cmd := exec.Command("sfdisk", "--no-reread", "--no-tell-kernel", "-q", ref)
	cmd.Stdin = strings.NewReader(script.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	ours, _ := readAt(bd.Path, 0, 34*512)
	theirs, _ := readAt(ref, 0, 34*512)
	oursEnd, _ := readAt(bd.Path, bd.Size-33*512, 33*512)
	theirsEnd, _ := readAt(ref, bd.Size-33*512, 33*512)
	if !bytes.Equal(ours, theirs) || !bytes.Equal(oursEnd, theirsEnd) {
		for _, off := range []int{0, 512, 1024} {
			if !bytes.Equal(ours[off:off+512], theirs[off:off+512]) {
				t.Errorf("sector %d differs:\nours   %s\nsfdisk %s", off/512, hex.EncodeToString(ours[off:off+128]), hex.EncodeToString(theirs[off:off+128]))
			}
		}
		t.Errorf("GPT differs from sfdisk's (sfdisk -d of ours:\n%s)", tool(t, "sfdisk", "-d", bd.Path))
	}
}

func TestDiskValidation(t *testing.T) {
	for name, d := range map[string]Disk{
		"empty":     {},
		"no name":   {Partitions: []Partition{{Size: mib}}},
		"dup name":  {Partitions: []Partition{{Name: "a", Size: mib}, {Name: "a", Size: mib}}},
		"no size":   {Partitions: []Partition{{Name: "a"}}},
		"long name": {Partitions: []Partition{{Name: strings.Repeat("x", 37), Size: mib}}},
		"bad uuid":  {Partitions: []Partition{{Name: "a", Size: mib, PartUUID: "nope"}}},
		"luks size": {Partitions: []Partition{{Name: "a", Size: 4 * mib, LUKS: &LUKS{Keys: [][]byte{{1}}}}}},
		"no keys":   {Partitions: []Partition{{Name: "a", Size: 8 * mib, LUKS: &LUKS{}}}},
	} {
		if _, err := d.Build(context.Background(), t.TempDir()); err == nil {
			t.Errorf("%s: built", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

// extract copies a partition out of the image so cryptsetup and
// e2fsprogs can read it as a file.
func extract(t *testing.T, bd *BuiltDisk, name string) string {
	t.Helper()
	b, err := bd.ReadPartition(name)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name+".img")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func keyFile(t *testing.T, key []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// opens reports whether cryptsetup accepts key for the LUKS volume file.
func opens(t *testing.T, file string, key []byte) bool {
	t.Helper()
	err := run(context.Background(), "cryptsetup", "open", "--test-passphrase", "--key-file", keyFile(t, key), file)
	if err != nil && !strings.Contains(err.Error(), "exit status 2") {
		t.Fatalf("cryptsetup failed for another reason than a wrong key: %v", err)
	}
	return err == nil
}

type luksDump struct {
	Keyslots map[string]struct {
		KDF struct {
			Type       string `json:"type"`
			Iterations int    `json:"iterations"`
		} `json:"kdf"`
	} `json:"keyslots"`
	Segments map[string]struct {
		Offset     string `json:"offset"`
		Encryption string `json:"encryption"`
		SectorSize int    `json:"sector_size"`
	} `json:"segments"`
}

func TestLUKSVolumes(t *testing.T) {
	ctx := context.Background()
	keys := [][]byte{[]byte("first key"), {0, 1, 2, 0xff, '\n', 0}, []byte("third")}
	hello := []byte("hello, encrypted world\n")
	d := Disk{Partitions: []Partition{
		{Name: "d512", Size: 12 * mib, LUKS: &LUKS{Keys: keys, Label: "d512", UUID: "0b1e6a8c-7f5e-4c6b-9a2d-3e4f5a6b7c8d"},
			FS: &Ext4{Label: "inner512", Files: []File{{Path: "/dir/hello.txt", Data: hello}}}},
		{Name: "d4k", Size: 12 * mib, LUKS: &LUKS{Keys: keys[:1], Label: "d4k", SectorSize: 4096},
			FS: &Ext4{Label: "inner4k", Files: []File{{Path: "/hello.txt", Data: hello}}}},
		{Name: "swap", Size: 8 * mib, Swap: true, LUKS: &LUKS{Keys: keys[:1], HeaderSize: 2 * mib}},
		{Name: "big", Size: 20 * mib, LUKS: &LUKS{Keys: keys[:1], HeaderSize: 16 * mib}},
	}}
	start := time.Now()
	bd, err := d.Build(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built %d LUKS partitions in %s", len(d.Partitions), time.Since(start))

	for i, bp := range bd.Partitions {
		file := extract(t, bd, bp.Name)
		l := bp.LUKS
		for slot, k := range l.Keys {
			if !opens(t, file, k) {
				t.Errorf("%s: key of slot %d refused", bp.Name, slot)
			}
		}
		if opens(t, file, []byte("wrong key")) {
			t.Errorf("%s: wrong key accepted", bp.Name)
		}
		if got := l.Slots(); len(got) != len(d.Partitions[i].LUKS.Keys) {
			t.Errorf("%s: slots %v", bp.Name, got)
		}

		var dump luksDump
		if err := json.Unmarshal([]byte(tool(t, "cryptsetup", "luksDump", "--dump-json-metadata", file)), &dump); err != nil {
			t.Fatal(err)
		}
		seg := dump.Segments["0"]
		if seg.Offset != fmt.Sprint(l.DataOffset) || seg.Encryption != "aes-xts-plain64" || seg.SectorSize != l.SectorSize {
			t.Errorf("%s: cryptsetup's segment %+v, harness %+v", bp.Name, seg, *l)
		}
		if len(dump.Keyslots) != len(l.Keys) {
			t.Errorf("%s: %d keyslots", bp.Name, len(dump.Keyslots))
		}
		for n, ks := range dump.Keyslots {
			if ks.KDF.Type != "pbkdf2" || ks.KDF.Iterations != 1000 {
				t.Errorf("%s: keyslot %s kdf %+v", bp.Name, n, ks.KDF)
			}
		}
		info := tool(t, "cryptsetup", "luksDump", file)
		if !strings.Contains(info, "UUID:          \t"+l.UUID) || !strings.Contains(info, "Label:         \t"+d.Partitions[i].LUKS.Label) {
			t.Errorf("%s: UUID %s / label %q not in luksDump:\n%s", bp.Name, l.UUID, d.Partitions[i].LUKS.Label, info)
		}
		// cryptsetup must hold the volume key the harness encrypted with.
		vk := tool(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile(t, l.Keys[0]), file)
		if !strings.Contains(strings.Join(strings.Fields(vk), " "), hexBlocks(l.VolumeKey)) {
			t.Errorf("%s: volume key differs from cryptsetup's:\n%s", bp.Name, vk)
		}
	}
	if got := bd.Partitions[0].LUKS.UUID; got != d.Partitions[0].LUKS.UUID {
		t.Errorf("given UUID not used: %s", got)
	}
	if got := bd.Partitions[2].LUKS.DataOffset; got != 2*mib {
		t.Errorf("swap data offset %d", got)
	}
	if got := bd.Partitions[3].LUKS.DataOffset; got != 16*mib {
		t.Errorf("16 MiB header: data offset %d", got)
	}

	// Decrypting what the harness wrote gives back the ext4 image.
	for _, c := range []struct{ part, path string }{{"d512", "/dir/hello.txt"}, {"d4k", "/hello.txt"}} {
		plain, err := bd.Decrypt(c.part)
		if err != nil {
			t.Fatal(err)
		}
		bp, _ := bd.Partition(c.part)
		img := filepath.Join(t.TempDir(), "plain.img")
		if err := os.WriteFile(img, plain, 0o600); err != nil {
			t.Fatal(err)
		}
		hdr := tool(t, "dumpe2fs", "-h", img)
		if !strings.Contains(hdr, "Filesystem UUID:          "+bp.FS.UUID) || !strings.Contains(hdr, "Filesystem volume name:   "+bp.FS.Label) {
			t.Errorf("%s: dumpe2fs doesn't show UUID %s label %s:\n%s", c.part, bp.FS.UUID, bp.FS.Label, hdr)
		}
		if got := tool(t, "debugfs", "-R", "cat "+c.path, img); got != string(hello) {
			t.Errorf("%s: debugfs cat %s = %q", c.part, c.path, got)
		}
		if out := tool(t, "e2fsck", "-fn", img); !strings.Contains(out, "clean") && !strings.Contains(out, "files") {
			t.Errorf("%s: e2fsck: %s", c.part, out)
		}
		// The ciphertext must not contain the plaintext.
		raw, _ := bd.ReadPartition(c.part)
		if bytes.Contains(raw, hello) {
			t.Errorf("%s: plaintext visible in the image", c.part)
		}
	}
}

// hexBlocks formats a key the way luksDump --dump-volume-key prints it.
func hexBlocks(b []byte) string {
	var parts []string
	for _, c := range b {
		parts = append(parts, fmt.Sprintf("%02x", c))
	}
	return strings.Join(parts, " ")
}

func TestKeyRotation(t *testing.T) {
	ctx := context.Background()
	old, next := []byte("old key"), []byte("next key")
	bd, err := Disk{Partitions: []Partition{
		{Name: "data", Size: 8 * mib, LUKS: &LUKS{Keys: [][]byte{old}}, FS: &Ext4{Files: []File{{Path: "/x", Data: []byte("x")}}}},
	}}.Build(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	before, _ := bd.Decrypt("data")
	slot, err := bd.AddKey(ctx, "data", next)
	if err != nil {
		t.Fatal(err)
	}
	if slot != 1 {
		t.Errorf("new key in slot %d", slot)
	}
	file := extract(t, bd, "data")
	if !opens(t, file, old) || !opens(t, file, next) {
		t.Fatal("a key is refused after AddKey")
	}
	if err := bd.KillSlot(ctx, "data", 0); err != nil {
		t.Fatal(err)
	}
	file = extract(t, bd, "data")
	if opens(t, file, old) || !opens(t, file, next) {
		t.Error("after KillSlot 0 the old key must fail and the new one open")
	}
	if got := bd.Partitions[0].LUKS.Slots(); len(got) != 1 || got[0] != 1 {
		t.Errorf("slots %v", got)
	}
	after, _ := bd.Decrypt("data")
	if !bytes.Equal(before, after) {
		t.Error("key rotation changed the data segment")
	}
	if _, err := bd.AddKey(ctx, "nope", next); err == nil {
		t.Error("AddKey on a missing partition")
	}
}

func TestDefaultFixture(t *testing.T) {
	ctx := context.Background()
	start := time.Now()
	fx, err := NewFixture(ctx, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built the default disk in %s", time.Since(start))
	if len(fx.Key) != 32 || !bytes.HasPrefix(fx.Hello, []byte("hello from unlockrd ")) {
		t.Fatalf("key %d bytes, hello %q", len(fx.Key), fx.Hello)
	}
	tbl := sfdiskJSON(t, fx.Disk.Path).PartitionTable
	var names []string
	for _, p := range tbl.Partitions {
		names = append(names, p.Name+"/"+p.Type)
	}
	want := "root/" + TypeLinuxFS + " data/" + TypeLinuxFS + " swap/" + TypeLinuxSwap
	if got := strings.Join(names, " "); got != want {
		t.Errorf("partitions %s, want %s", got, want)
	}

	root := extract(t, fx.Disk, "root")
	hdr := tool(t, "dumpe2fs", "-h", root)
	if !strings.Contains(hdr, "Filesystem volume name:   root") {
		t.Errorf("root label: %s", hdr)
	}
	ls := tool(t, "debugfs", "-R", "ls -l /sbin", root)
	if !strings.Contains(ls, "init") || !strings.Contains(ls, "100755") {
		t.Errorf("/sbin: %s", ls)
	}
	for _, dir := range []string{"/dev", "/proc", "/sys", "/run", DataMountPoint} {
		if out := tool(t, "debugfs", "-R", "stat "+dir, root); !strings.Contains(out, "Type: directory") {
			t.Errorf("%s in root: %s", dir, out)
		}
	}
	var cfg TestInitConfig
	if err := json.Unmarshal([]byte(tool(t, "debugfs", "-R", "cat /etc/testinit.json", root)), &cfg); err != nil {
		t.Fatal(err)
	}
	if len(cfg.Files) != 1 || cfg.Files[0] != HelloPath {
		t.Errorf("testinit config %+v", cfg)
	}
	if out := tool(t, "debugfs", "-R", "stat /", root); !strings.Contains(out, "User:     0   Group:     0") {
		t.Errorf("root owner: %s", out)
	}

	data, _ := fx.Disk.Partition("data")
	if data.LUKS.SectorSize != 4096 || data.FS == nil || data.FS.Label != "data" {
		t.Errorf("data %+v", data)
	}
	swap, _ := fx.Disk.Partition("swap")
	if swap.LUKS.SectorSize != 512 || swap.FS != nil {
		t.Errorf("swap %+v", swap)
	}
	for _, name := range []string{"data", "swap"} {
		file := extract(t, fx.Disk, name)
		if !opens(t, file, fx.Key) {
			t.Errorf("%s: fixture key refused", name)
		}
	}
	plain, err := fx.Disk.Decrypt("data")
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(img, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	if got := tool(t, "debugfs", "-R", "cat "+HelloFile, img); got != string(fx.Hello) {
		t.Errorf("hello.txt = %q, want %q", got, fx.Hello)
	}
	if got, want := fx.HelloLine(), TestInitPrefix+"file "+HelloPath+" sha256="+fx.HelloSHA256()+" content="+strings.SplitN(string(fx.Hello), "\n", 2)[0]; got != want {
		t.Errorf("HelloLine %q, want %q", got, want)
	}
}
