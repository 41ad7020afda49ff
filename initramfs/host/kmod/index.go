package kmod

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
)

// readModulesDep parses depmod's modules.dep: one line per module, its
// path, a colon, and the paths of all its dependencies (depmod lists the
// whole transitive set). It returns each module's path and dependency
// names.
func readModulesDep(file string) (files map[string]string, deps map[string][]string, err error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, err
	}
	files = map[string]string{}
	deps = map[string][]string{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		mod, rest, ok := strings.Cut(line, ":")
		name := nameOf(mod)
		if !ok || name == "" {
			return nil, nil, fmt.Errorf("%s:%d: malformed line %q", file, i+1, line)
		}
		var ds []string
		for _, d := range strings.Fields(rest) {
			dn := nameOf(d)
			if dn == "" {
				return nil, nil, fmt.Errorf("%s:%d: %q is not a module file", file, i+1, d)
			}
			ds = append(ds, dn)
		}
		if _, dup := files[name]; dup {
			// depmod writes the module it chose first.
			continue
		}
		files[name] = relPath(mod)
		deps[name] = ds
	}
	return files, deps, nil
}

// relPath makes a modules.dep path relative to the tree: depmod writes
// relative paths, the module-init-tools it replaced wrote absolute ones.
func relPath(p string) string {
	if !strings.HasPrefix(p, "/") {
		return p
	}
	if i := strings.Index(p, "/lib/modules/"); i >= 0 {
		rest := p[i+len("/lib/modules/"):]
		if _, after, ok := strings.Cut(rest, "/"); ok {
			return after
		}
	}
	return strings.TrimPrefix(p, "/")
}

// softdep is a module's soft dependencies, as names or aliases.
type softdep struct{ pre, post []string }

// readModulesSoftdep parses depmod's modules.softdep
// ("softdep ext4 pre: crypto-crc32c").
func readModulesSoftdep(file string) (map[string]softdep, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	out := map[string]softdep{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "softdep" {
			continue
		}
		name := Normalize(f[1])
		sd := out[name]
		sd.addSpec(strings.Join(f[2:], " "))
		out[name] = sd
	}
	return out, nil
}

// addSpec adds "pre: a b post: c" to sd. Names before any "pre:" or
// "post:" mean nothing to modprobe either, and are dropped.
func (sd *softdep) addSpec(spec string) {
	var into *[]string
	for _, w := range strings.Fields(spec) {
		switch w {
		case "pre:":
			into = &sd.pre
		case "post:":
			into = &sd.post
		default:
			if into != nil {
				*into = append(*into, w)
			}
		}
	}
}

// readBuiltin reads the names and aliases of modules compiled into the
// kernel. Without modules.builtin a request for a built-in module is
// reported as missing, which is the safe side.
func (t *Tree) readBuiltin() error {
	b, err := os.ReadFile(filepath.Join(t.dir, "modules.builtin"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		t.note("%s: no modules.builtin: modules built into the kernel will be reported as missing", t.dir)
	case err != nil:
		return fmt.Errorf("module tree %s: %w", t.dir, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if n := nameOf(strings.TrimSpace(line)); n != "" {
			t.builtin[n] = true
		}
	}
	t.builtinAliases = newAliasIndex()
	b, err = os.ReadFile(filepath.Join(t.dir, "modules.builtin.modinfo"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("module tree %s: %w", t.dir, err)
	}
	// NUL-separated "module.key=value" records.
	for _, rec := range bytes.Split(b, []byte{0}) {
		mod, kv, ok := strings.Cut(string(rec), ".")
		if !ok {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		mod = Normalize(mod)
		t.builtin[mod] = true
		if k == "alias" {
			t.builtinAliases.add(v, mod)
		}
	}
	return nil
}

// aliasIndex finds the modules that declare an alias. Most aliases are
// plain strings (crypto-crc32c); device aliases are shell patterns
// (pci:v00001AF4d*sv*...), matched the way modprobe matches them.
type aliasIndex struct {
	exact    map[string][]string
	patterns []aliasPattern
}

type aliasPattern struct{ pattern, module string }

func newAliasIndex() *aliasIndex {
	return &aliasIndex{exact: map[string][]string{}}
}

func (a *aliasIndex) add(alias, module string) {
	al := normalizeAlias(alias)
	if strings.ContainsAny(al, "*?[") {
		a.patterns = append(a.patterns, aliasPattern{al, module})
		return
	}
	a.exact[al] = append(a.exact[al], module)
}

// lookup returns the modules providing name, sorted and without
// duplicates.
func (a *aliasIndex) lookup(name string) []string {
	name = normalizeAlias(name)
	set := map[string]bool{}
	for _, m := range a.exact[name] {
		set[m] = true
	}
	for _, p := range a.patterns {
		// path.Match's * does not cross "/", fnmatch's does; the names
		// looked up here (soft dependencies, configured modules) have no
		// slash.
		if ok, _ := path.Match(p.pattern, name); ok {
			set[p.module] = true
		}
	}
	out := make([]string, 0, len(set))
	for m := range set {
		out = append(out, m)
	}
	sort.Strings(out)
	return out
}

// normalizeAlias turns "-" into "_" outside of bracket expressions, as
// modprobe does before comparing aliases, so that crypto-crc32c and
// crypto_crc32c are the same alias while [a-z] stays a range.
func normalizeAlias(s string) string {
	var b strings.Builder
	inBracket := false
	for _, c := range s {
		switch {
		case inBracket:
			if c == ']' {
				inBracket = false
			}
		case c == '[':
			inBracket = true
		case c == '-':
			c = '_'
		}
		b.WriteRune(c)
	}
	return b.String()
}

// loadAliases returns the alias index of the tree's module files,
// building it on first use: from modules.alias when depmod made one, else
// by reading the .modinfo section of every module. The scan costs a read of
// the whole tree, so it only happens when a soft dependency or a requested
// name is not a module name.
func (t *Tree) loadAliases() (*aliasIndex, error) {
	t.mu.Lock()
	idx := t.aliases
	t.mu.Unlock()
	if idx != nil {
		return idx, nil
	}
	idx, err := t.buildAliasIndex()
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	if t.aliases == nil {
		t.aliases = idx
	}
	idx = t.aliases
	t.mu.Unlock()
	return idx, nil
}

func (t *Tree) buildAliasIndex() (*aliasIndex, error) {
	if t.hasDep {
		idx, err := readModulesAlias(filepath.Join(t.dir, "modules.alias"))
		if err == nil {
			t.mu.Lock()
			t.aliasesFromFile = true
			t.mu.Unlock()
			return idx, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	names := sortedNames(t.files)
	cache := t.aliasCacheFile(names)
	if idx := readAliasCache(cache); idx != nil {
		return idx, nil
	}
	aliases := make([][]string, len(names))
	errs := make([]error, len(names))
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < runtime.GOMAXPROCS(0); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var sb scanBuffers
			for i := range next {
				p := filepath.Join(t.dir, filepath.FromSlash(t.files[names[i]]))
				if strings.HasSuffix(p, ".ko.xz") {
					as, ok, err := scanAliasesXZ(p, names[i], &sb)
					if err != nil {
						errs[i] = fmt.Errorf("module %s: %w", names[i], err)
						continue
					}
					if ok {
						aliases[i] = as
						continue
					}
				}
				mi, err := readModinfoFile(p)
				if err != nil {
					errs[i] = fmt.Errorf("module %s: %w", names[i], err)
					continue
				}
				aliases[i] = mi.aliases
			}
		}()
	}
	for i := range names {
		next <- i
	}
	close(next)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("reading module aliases in %s: %w", t.dir, err)
	}
	byName := map[string][]string{}
	for i, name := range names {
		byName[name] = aliases[i]
	}
	if cache != "" {
		if err := writeAliasCache(cache, byName); err != nil {
			t.note("alias cache %s: %v (the next build scans the tree again)", cache, err)
		}
	}
	return indexOf(byName), nil
}

func indexOf(byName map[string][]string) *aliasIndex {
	idx := newAliasIndex()
	for _, name := range sortedKeys(byName) {
		for _, a := range byName[name] {
			idx.add(a, name)
		}
	}
	return idx
}

func sortedKeys(m map[string][]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// aliasCacheFile names the cached alias scan of this tree as it is now:
// a tree without modules.alias costs a scan of every module (seconds for
// Debian 13's .ko.xz tree), and the builder is run on the same tree again
// and again. The name is a hash of every module file's path, size and
// modification time, so any change to the tree is a new file; "" when
// there is no user cache folder or a file cannot be stat'ed.
func (t *Tree) aliasCacheFile(names []string) string {
	base, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	h := sha256.New()
	fmt.Fprintf(h, "unlockrd kmod aliases v1\x00%s\x00", t.release)
	for _, n := range names {
		st, err := os.Stat(filepath.Join(t.dir, filepath.FromSlash(t.files[n])))
		if err != nil {
			return ""
		}
		fmt.Fprintf(h, "%s\x00%s\x00%d\x00%d\x00", n, t.files[n], st.Size(), st.ModTime().UnixNano())
	}
	return filepath.Join(base, "unlockrd", "kmod-aliases", hex.EncodeToString(h.Sum(nil))+".json")
}

// readAliasCache returns the cached index, or nil when there is none
// usable (a damaged file is scanned over again).
func readAliasCache(file string) *aliasIndex {
	if file == "" {
		return nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil
	}
	var byName map[string][]string
	if json.Unmarshal(b, &byName) != nil || byName == nil {
		return nil
	}
	return indexOf(byName)
}

// writeAliasCache writes the scan atomically: a concurrent build reads
// either no file or a whole one.
func writeAliasCache(file string, byName map[string][]string) error {
	b, err := json.Marshal(byName)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(file), ".aliases-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), file)
}

// readModulesAlias parses depmod's modules.alias ("alias PATTERN MODULE").
func readModulesAlias(file string) (*aliasIndex, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	idx := newAliasIndex()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 3 && fs[0] == "alias" {
			idx.add(fs[1], Normalize(fs[2]))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return idx, nil
}
