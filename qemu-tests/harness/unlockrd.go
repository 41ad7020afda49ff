package harness

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"text/template"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// Bins are unlockrd's own binaries, built from the checkout.
type Bins struct {
	Dir        string // holds all three, as `make build` lays them out
	Init       string
	Mkunlockrd string
	KeyServer  string
}

var (
	binsMu sync.Mutex
	bins   *Bins
)

// Binaries builds unlockrd-init, mkunlockrd and unlockrd-keyserver once
// per process into <module root>/.cache/harness/bin (the Go build cache
// makes repeated builds cheap). The init is built exactly as the Makefile
// builds it, so the tests boot what users ship.
func Binaries(ctx context.Context) (*Bins, error) {
	binsMu.Lock()
	defer binsMu.Unlock()
	if bins != nil {
		return bins, nil
	}
	if d := os.Getenv("UNLOCKRD_BIN_DIR"); d != "" {
		// Prebuilt binaries, e.g. to compare two builds of one of them.
		bins = &Bins{Dir: d, Init: filepath.Join(d, "unlockrd-init"),
			Mkunlockrd: filepath.Join(d, "mkunlockrd"), KeyServer: filepath.Join(d, "unlockrd-keyserver")}
		return bins, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Join(root, ".cache"), "bin-")
	if err != nil {
		if err := os.MkdirAll(filepath.Join(root, ".cache"), 0o755); err != nil {
			return nil, err
		}
		if dir, err = os.MkdirTemp(filepath.Join(root, ".cache"), "bin-"); err != nil {
			return nil, err
		}
	}
	b := &Bins{
		Dir:        dir,
		Init:       filepath.Join(dir, "unlockrd-init"),
		Mkunlockrd: filepath.Join(dir, "mkunlockrd"),
		KeyServer:  filepath.Join(dir, "unlockrd-keyserver"),
	}
	// As the Makefile: static, but the key server with cgo (PKCS#11).
	builds := []struct {
		cgo  string
		args []string
	}{
		{"0", []string{"build", "-trimpath", "-ldflags=-s -w -buildid=", "-o", b.Init, "./cmd/unlockrd-init"}},
		{"0", []string{"build", "-trimpath", "-o", dir + "/", "./cmd/mkunlockrd"}},
		{"1", []string{"build", "-trimpath", "-o", dir + "/", "./cmd/unlockrd-keyserver"}},
	}
	for _, bl := range builds {
		cmd := exec.CommandContext(ctx, "go", bl.args...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED="+bl.cgo)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("harness: go %s: %w\n%s", strings.Join(bl.args, " "), err, out)
		}
	}
	bins = b
	return b, nil
}

// KeyServer is a running unlockrd-keyserver process on 127.0.0.1.
type KeyServer struct {
	Bin  string
	Data string
	Addr string // 127.0.0.1:port
	Pin  string

	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	logs bytes.Buffer
}

// NewKeyServerData initialises a key server data folder (TLS key, master
// key) without starting the server, and returns its pin.
func NewKeyServerData(ctx context.Context, bin, dir string) (string, error) {
	if _, err := RunTool(ctx, bin, "init", "--data", dir); err != nil {
		return "", err
	}
	out, err := RunTool(ctx, bin, "pin", "--data", dir)
	return strings.TrimSpace(string(out)), err
}

// Enrolled is a key server data folder with one host enrolled: what every
// boot test, the demo and the benchmarks start from.
type Enrolled struct {
	Bins  *Bins
	Data  string // the key server's data folder
	Host  string
	Token string
	// Key is the host's current key, as the operator takes it from the
	// server (`host key`) to format the volumes.
	Key []byte
}

// Enroll builds the binaries, initialises a key server data folder in
// dir/keyserver and enrols host.
func Enroll(ctx context.Context, dir, host string) (*Enrolled, error) {
	b, err := Binaries(ctx)
	if err != nil {
		return nil, err
	}
	e := &Enrolled{Bins: b, Data: filepath.Join(dir, "keyserver"), Host: host}
	if _, err := NewKeyServerData(ctx, b.KeyServer, e.Data); err != nil {
		return nil, err
	}
	if e.Token, err = AddHost(ctx, b.KeyServer, e.Data, host, nil); err != nil {
		return nil, err
	}
	if e.Key, err = HostKey(ctx, b.KeyServer, e.Data, host); err != nil {
		return nil, err
	}
	return e, nil
}

// Serve starts the key server on e's data folder (see StartKeyServer).
func (e *Enrolled) Serve(ctx context.Context, log io.Writer, extra ...string) (*KeyServer, error) {
	return StartKeyServer(ctx, e.Bins.KeyServer, e.Data, "", log, extra...)
}

// StartKeyServer runs `unlockrd-keyserver serve` on a free loopback port
// (addr "" picks one) and waits until it prints its pin. extra arguments
// go to serve. Output goes to log (and is kept for Logs).
func StartKeyServer(ctx context.Context, bin, dataDir, addr string, log io.Writer, extra ...string) (*KeyServer, error) {
	if addr == "" {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		addr = l.Addr().String()
		l.Close()
	}
	k := &KeyServer{Bin: bin, Data: dataDir, Addr: addr, done: make(chan struct{})}
	args := append([]string{"serve", "--data", dataDir, "--listen", addr}, extra...)
	k.cmd = exec.Command(bin, args...)
	pr, pw := io.Pipe()
	k.cmd.Stdout = pw
	k.cmd.Stderr = pw
	if err := k.cmd.Start(); err != nil {
		return nil, fmt.Errorf("harness: start key server: %w", err)
	}
	go func() {
		_ = k.cmd.Wait()
		pw.Close()
		close(k.done)
	}()
	pinc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			k.mu.Lock()
			k.logs.WriteString(line + "\n")
			k.mu.Unlock()
			if log != nil {
				fmt.Fprintf(log, "keyserver: %s\n", line)
			}
			if p, ok := strings.CutPrefix(line, "pin: "); ok {
				select {
				case pinc <- strings.TrimSpace(p):
				default:
				}
			}
		}
	}()
	select {
	case p := <-pinc:
		k.Pin = p
	case <-k.done:
		return nil, fmt.Errorf("harness: key server exited before listening:\n%s", k.Logs())
	case <-time.After(time.Minute):
		k.Stop()
		return nil, fmt.Errorf("harness: key server printed no pin within a minute:\n%s", k.Logs())
	case <-ctx.Done():
		k.Stop()
		return nil, ctx.Err()
	}
	// The pin is printed once it listens; make sure the port answers.
	for i := 0; i < 100; i++ {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return k, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	k.Stop()
	return nil, fmt.Errorf("harness: key server does not accept connections on %s", addr)
}

// Logs returns everything the server printed so far (audit lines).
func (k *KeyServer) Logs() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.logs.String()
}

// Stop terminates the server gracefully (SIGTERM), then kills it.
func (k *KeyServer) Stop() {
	if k == nil || k.cmd == nil || k.cmd.Process == nil {
		return
	}
	_ = k.cmd.Process.Signal(os.Interrupt)
	select {
	case <-k.done:
	case <-time.After(10 * time.Second):
		_ = k.cmd.Process.Kill()
		<-k.done
	}
}

// Kill ends the server with SIGKILL, as a crash or a lost machine would
// (no graceful shutdown), and waits for it to exit.
func (k *KeyServer) Kill() {
	if k == nil || k.cmd == nil || k.cmd.Process == nil {
		return
	}
	_ = k.cmd.Process.Kill()
	<-k.done
}

// GuestURL is the key URL template as the guest on user networking sees
// this server.
func (k *KeyServer) GuestURL() string {
	_, port, _ := net.SplitHostPort(k.Addr)
	return "https://" + GuestHostIP + ":" + port + "/v1/keys/{host}"
}

// AddHost enrols a host and returns its token; key, when non-nil, is
// enrolled as the host's key instead of a random one.
func AddHost(ctx context.Context, bin, data, host string, key []byte) (string, error) {
	args := []string{"host", "add", "--data", data}
	var in io.Reader
	if key != nil {
		args = append(args, "--key-file", "-")
		in = bytes.NewReader(key)
	}
	args = append(args, host)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin = in
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("harness: keyserver host add %s: %w: %s", host, err, stderr.String())
	}
	tok := strings.TrimSpace(string(out))
	if tok == "" || strings.ContainsAny(tok, " \n") {
		return "", fmt.Errorf("harness: keyserver host add printed %q, want a token alone", out)
	}
	return tok, nil
}

// HostKey returns a host's current raw key.
func HostKey(ctx context.Context, bin, data, host string) ([]byte, error) {
	return RunTool(ctx, bin, "host", "key", "--data", data, host)
}

// RunTool runs one of the binaries and returns its stdout.
func RunTool(ctx context.Context, bin string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("harness: %s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// ImageConfig is the unlockrd.yaml of a test image. Zero fields take the
// walking-skeleton values.
type ImageConfig struct {
	URLs    []string
	Pins    []string
	Host    string // default smbios-uuid
	Token   string // default credential; "-" for none
	Root    string // default PARTLABEL=root
	Data    string // default PARTLABEL=data
	Swap    string // default PARTLABEL=swap; "-" for no swap volume
	Mount   string // default DataMountPoint
	Extra   string // appended verbatim (more YAML)
	Modules []string
	// AttemptTimeout default 5s: the tests kill servers on purpose.
	AttemptTimeout string
	// Kernel is the cached kernel's name (kernelcache.Names) whose
	// modules the image is built from; default kernelcache.Default.
	Kernel string
}

// DefaultModules are what the skeleton needs on Debian's kernels, as the
// README's and DESIGN §3's example lists them. The builder adds to them by
// default the accelerated AES drivers (aesni_intel and its dependencies,
// optional), so the image under test is the default image.
var DefaultModules = []string{"virtio_pci", "virtio_blk", "virtio_net", "dm_crypt", "ext4"}

var configTmpl = template.Must(template.New("cfg").Parse(`key:
  urls:
{{- range .URLs}}
    - {{.}}
{{- end}}
  pins:
{{- range .Pins}}
    - {{.}}
{{- end}}
  host: {{.Host}}
{{- if ne .Token "-"}}
  token: {{.Token}}
{{- end}}
  attempt_timeout: {{.AttemptTimeout}}
root:
  device: {{.Root}}
  fstype: ext4
  options: [ro]
volumes:
  - name: data
    device: {{.Data}}
    mount: {{.Mount}}
    fstype: ext4
    options: [noatime]
{{- if ne .Swap "-"}}
  - name: swap
    device: {{.Swap}}
    swap: true
{{- end}}
modules:
{{- range .Modules}}
  - {{.}}
{{- end}}
{{.Extra}}
`))

// YAML renders the configuration.
func (c ImageConfig) YAML() string {
	if c.Host == "" {
		c.Host = "smbios-uuid"
	}
	if c.Token == "" {
		c.Token = "credential"
	}
	if c.Root == "" {
		c.Root = "PARTLABEL=root"
	}
	if c.Data == "" {
		c.Data = "PARTLABEL=data"
	}
	if c.Swap == "" {
		c.Swap = "PARTLABEL=swap"
	}
	if c.Mount == "" {
		c.Mount = DataMountPoint
	}
	if len(c.Modules) == 0 {
		c.Modules = DefaultModules
	}
	if c.AttemptTimeout == "" {
		c.AttemptTimeout = "5s"
	}
	var b strings.Builder
	if err := configTmpl.Execute(&b, c); err != nil {
		panic(err)
	}
	return b.String()
}

// BuildImage writes cfg to dir/unlockrd.yaml and runs `mkunlockrd build`
// for the cached kernel cfg.Kernel into dir/initramfs.img.
func BuildImage(ctx context.Context, b *Bins, cfg ImageConfig, dir string, extra ...string) (string, error) {
	name := cfg.Kernel
	if name == "" {
		name = kernelcache.Default
	}
	k, err := KernelNamed(name)
	if err != nil {
		return "", err
	}
	yml := filepath.Join(dir, "unlockrd.yaml")
	if err := os.WriteFile(yml, []byte(cfg.YAML()), 0o644); err != nil {
		return "", err
	}
	img := filepath.Join(dir, "initramfs.img")
	args := append([]string{"build", "-c", yml, "-m", k.Modules, "-o", img}, extra...)
	if _, err := RunTool(ctx, b.Mkunlockrd, args...); err != nil {
		return "", err
	}
	if _, err := os.Stat(img); err != nil {
		return "", errors.New("harness: mkunlockrd wrote no image")
	}
	return img, nil
}

// RandomUUID is a random (version 4) UUID, e.g. a VM's SMBIOS UUID and
// so its host id.
func RandomUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read does not fail (Go 1.24+)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// TokenCredential is the -smbios argument that hands the token over as a
// systemd-style credential.
func TokenCredential(token string) string {
	return "type=11,value=io.systemd.credential:unlockrd.token=" + token
}
