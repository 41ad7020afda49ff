// Package softhsmtest makes real SoftHSM2 tokens in a temporary folder
// (Debian's softhsm2, initialised with its own softhsm2-util), for tests
// and the bench of the PKCS#11 master key.
package softhsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Module is Debian's SoftHSM2 PKCS#11 module.
const Module = "/usr/lib/softhsm/libsofthsm2.so"

// ConfEnv is the variable SoftHSM2 reads its configuration path from.
const ConfEnv = "SOFTHSM2_CONF"

// Tokens is a SoftHSM2 configuration whose token folder is private.
type Tokens struct {
	// Conf is the configuration file: set ConfEnv to it in every process
	// that uses the tokens (Env does).
	Conf string
	PIN  string
}

// New writes a configuration under dir and initialises one token per
// label, each with user PIN pin. Without softhsm2 installed it fails,
// naming the package.
func New(dir, pin string, labels ...string) (*Tokens, error) {
	if _, err := os.Stat(Module); err != nil {
		return nil, fmt.Errorf("softhsmtest: %w (install-deps.sh installs softhsm2)", err)
	}
	td := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(td, 0o700); err != nil {
		return nil, err
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	text := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", td)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return nil, err
	}
	t := &Tokens{Conf: conf, PIN: pin}
	for _, l := range labels {
		cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", l, "--pin", pin, "--so-pin", "so-"+pin)
		cmd.Env = t.Env(os.Environ())
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("softhsmtest: softhsm2-util --init-token %s: %w: %s", l, err, out)
		}
	}
	return t, nil
}

// Env returns env with ConfEnv pointing at these tokens.
func (t *Tokens) Env(env []string) []string {
	out := make([]string, 0, len(env)+1)
	for _, e := range env {
		if !strings.HasPrefix(e, ConfEnv+"=") {
			out = append(out, e)
		}
	}
	return append(out, ConfEnv+"="+t.Conf)
}

// URI names object on token with the PIN given inline (pin-value).
func (t *Tokens) URI(token, object string) string {
	return fmt.Sprintf("pkcs11:token=%s;object=%s?module-path=%s&pin-value=%s", token, object, Module, t.PIN)
}

// PINFileURI is URI with the PIN read from file (pin-source), written
// under dir.
func (t *Tokens) PINFileURI(dir, token, object string) (string, error) {
	f := filepath.Join(dir, "pin-"+token)
	if err := os.WriteFile(f, []byte(t.PIN+"\n"), 0o600); err != nil {
		return "", err
	}
	return fmt.Sprintf("pkcs11:token=%s;object=%s?module-path=%s&pin-source=file:%s", token, object, Module, f), nil
}
