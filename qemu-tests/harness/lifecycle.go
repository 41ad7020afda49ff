package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// ExtractPartition copies partition name of the disk into its own file
// (dir/name.img), for cryptsetup and blkid to judge as the guest left it.
func (d *BuiltDisk) ExtractPartition(name, dir string) (string, error) {
	b, err := d.ReadPartition(name)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, name+".img")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", err
	}
	return path, nil
}

// CryptsetupOpens asks `cryptsetup open --test-passphrase` whether key
// opens the LUKS volume in file, and which keyslot it opened (-1: none).
// The key goes through stdin, never the command line.
func CryptsetupOpens(ctx context.Context, file string, key []byte) (int, error) {
	cmd := exec.CommandContext(ctx, "cryptsetup", "open", "--test-passphrase", "-v", "--key-file", "-", file)
	cmd.Stdin = bytes.NewReader(key)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 2 {
			return -1, nil // no key available with this passphrase
		}
		return -1, fmt.Errorf("cryptsetup open --test-passphrase %s: %v: %s", file, err, out)
	}
	m := regexp.MustCompile(`Key slot ([0-9]+) unlocked`).FindSubmatch(out)
	if m == nil {
		return -1, fmt.Errorf("cryptsetup open --test-passphrase %s: no keyslot named in %q", file, out)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n, nil
}

// LuksDump is `cryptsetup luksDump` of file (after `cryptsetup isLuks`).
func LuksDump(ctx context.Context, file string) (string, error) {
	if out, err := exec.CommandContext(ctx, "cryptsetup", "isLuks", "--type", "luks2", file).CombinedOutput(); err != nil {
		return "", fmt.Errorf("cryptsetup isLuks %s: %v: %s", file, err, out)
	}
	out, err := exec.CommandContext(ctx, "cryptsetup", "luksDump", file).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("cryptsetup luksDump %s: %v: %s", file, err, out)
	}
	return string(out), nil
}

// Blkid is what `blkid -p -o export` says of file (TYPE=..., one per
// line), "" when it finds nothing.
func Blkid(ctx context.Context, file string) string {
	out, _ := exec.CommandContext(ctx, "blkid", "-p", "-o", "export", file).Output()
	return strings.TrimSpace(string(out))
}

// HostState is the state `unlockrd-keyserver host list --json` shows for
// host, with its key ids.
func HostState(ctx context.Context, bin, data, host string) (string, []string, error) {
	out, err := RunTool(ctx, bin, "host", "list", "--json", "--data", data)
	if err != nil {
		return "", nil, err
	}
	var list []struct {
		Host  string   `json:"host"`
		State string   `json:"state"`
		Keys  []string `json:"keys"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return "", nil, fmt.Errorf("host list --json: %v: %s", err, out)
	}
	for _, h := range list {
		if h.Host == host {
			return h.State, h.Keys, nil
		}
	}
	return "", nil, fmt.Errorf("host %s not in host list: %s", host, out)
}
