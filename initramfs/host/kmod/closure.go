package kmod

import (
	"fmt"
	"sort"
	"strings"
)

// impliedDep is a module another module needs at run time but asks the
// kernel for by name (request_module), which calls modprobe: the image has
// none, so the builder must carry the module and load it up front.
type impliedDep struct {
	name string
	// required modules are always needed; the others are accelerations
	// that may not load on every CPU.
	required bool
	// accel marks an accelerated implementation of a cipher, left out
	// when the closure is asked for none (Options.NoAcceleration).
	accel bool
}

// implied maps a module to the modules it implies. It is a fixed table,
// not configuration: it describes what the boot sequence (DESIGN §2, §6)
// asks of the kernel. Entries for another architecture are not files of
// the tree and are skipped.
var implied = map[string][]impliedDep{
	"dm_crypt": {
		// Opening an aes-xts-plain64 volume makes dm-crypt allocate
		// "xts(aes)"; the crypto API then asks for the xts template with
		// request_module and fails without it.
		{name: "xts", required: true},
		// The cipher implementation is chosen when a volume is opened
		// and kept for the life of the mapping: without the accelerated
		// driver loaded by then, the volume runs on the generic AES code
		// (an order of magnitude slower) until the next boot. Optional: a
		// CPU without the instructions refuses to load it (ENODEV) and
		// the boot goes on with the generic code. Their dependencies
		// (crypto_simd, cryptd, gf128mul) follow from the modules.
		{name: "aesni_intel", accel: true},  // x86-64: AES-NI
		{name: "aes_ce_blk", accel: true},   // arm64: crypto extensions
		{name: "aes_neon_blk", accel: true}, // arm64 without them
	},
}

// IsAcceleration reports whether name is one of the accelerated cipher
// drivers a closure carries by default, for any architecture.
func IsAcceleration(name string) bool {
	for _, ims := range implied {
		for _, im := range ims {
			if im.accel && im.name == Normalize(name) {
				return true
			}
		}
	}
	return false
}

// Options adjust a closure.
type Options struct {
	// NoAcceleration leaves out the accelerated cipher drivers dm_crypt
	// implies (Tree.Accelerations names those a tree would have had).
	NoAcceleration bool
}

// Accelerations returns the accelerated cipher drivers of the tree that
// the closure of names would carry by default: what Options.NoAcceleration
// leaves out, for the builder's warning.
func (t *Tree) Accelerations(names []string) ([]string, error) {
	with, err := t.Closure(names)
	if err != nil {
		return nil, err
	}
	without, err := t.ClosureWith(names, Options{NoAcceleration: true})
	if err != nil {
		return nil, err
	}
	in := map[string]bool{}
	for _, m := range without {
		in[m.Name] = true
	}
	var out []string
	for _, m := range with {
		if !in[m.Name] {
			out = append(out, m.Name)
		}
	}
	return out, nil
}

// Closure returns the modules to load for the requested names, each after
// every module it needs: the requested modules, their dependencies, the
// providers of their soft dependencies (marked Optional) and the modules
// they imply (dm_crypt implies xts). Requested modules that are built into
// the kernel are skipped quietly; one that exists nowhere is an error
// naming it. A requested name that is not a module name may be an alias
// with exactly one provider (ext3 → ext4).
//
// Accelerated cipher drivers are included (Optional); see ClosureWith.
//
// The order is deterministic: requested modules in the order given, each
// preceded by what it needs, depth first.
func (t *Tree) Closure(names []string) ([]Module, error) {
	return t.ClosureWith(names, Options{})
}

// ClosureWith is Closure with options.
func (t *Tree) ClosureWith(names []string, o Options) ([]Module, error) {
	c := &closer{
		t:     t,
		opts:  o,
		state: map[string]int{},
		edges: map[string]*edges{},
		pos:   map[string]int{},
	}
	var roots []string
	seen := map[string]bool{}
	for _, n := range names {
		name, err := t.resolveRequest(n)
		if err != nil {
			return nil, err
		}
		if name == "" || seen[name] {
			continue
		}
		seen[name] = true
		roots = append(roots, name)
	}
	required := map[string]bool{}
	for _, r := range roots {
		if err := c.markRequired(r, required); err != nil {
			return nil, err
		}
	}
	for _, r := range roots {
		if err := c.visit(r, true); err != nil {
			return nil, err
		}
	}
	return c.modules(required), nil
}

// resolveRequest maps a configured name to a module of the tree, or to ""
// for a module built into the kernel.
func (t *Tree) resolveRequest(n string) (string, error) {
	name := Normalize(n)
	if _, ok := t.files[name]; ok {
		return name, nil
	}
	if t.builtin[name] {
		return "", nil
	}
	idx, err := t.loadAliases()
	if err != nil {
		return "", err
	}
	provs, err := t.confirm(t.inTree(idx.lookup(n)), n)
	if err != nil {
		return "", err
	}
	switch {
	case len(provs) == 1:
		t.note("module %s: an alias of %s", n, provs[0])
		return provs[0], nil
	case len(provs) > 1:
		return "", fmt.Errorf("module %s: not a module name but an alias provided by %s: list the one(s) you need by name",
			n, strings.Join(provs, ", "))
	case len(t.builtinAliases.lookup(n)) > 0:
		return "", nil
	}
	return "", fmt.Errorf("module %s: %w in %s (no module file, not built into the kernel, no module with that alias)",
		n, ErrNotFound, t.dir)
}

// inTree keeps the names that are module files of the tree.
func (t *Tree) inTree(names []string) []string {
	var out []string
	for _, n := range names {
		if _, ok := t.files[n]; ok {
			out = append(out, n)
		}
	}
	return out
}

// confirm keeps the candidates whose own .modinfo section, read whole and
// exactly, declares an alias matching target: the tree-wide alias scan of
// compressed modules reads only a prefix of each (scanAliasesXZ).
func (t *Tree) confirm(cands []string, target string) ([]string, error) {
	t.mu.Lock()
	fromIndexFile := t.aliasesFromFile
	t.mu.Unlock()
	if fromIndexFile {
		return cands, nil // modules.alias is the truth
	}
	var out []string
	for _, c := range cands {
		if !strings.HasSuffix(t.files[c], ".ko.xz") {
			out = append(out, c) // read whole already
			continue
		}
		mi, err := t.modinfo(c)
		if err != nil {
			return nil, err
		}
		idx := newAliasIndex()
		for _, a := range mi.aliases {
			idx.add(a, c)
		}
		if len(idx.lookup(target)) > 0 {
			out = append(out, c)
		}
	}
	return out, nil
}

// edges are the modules one module must follow (hard, pre, implied) or
// precede (post), restricted to module files of the tree.
type edges struct {
	hard, pre, post []string
	implied         []impliedDep
}

// closer holds the state of one Closure call.
type closer struct {
	t     *Tree
	opts  Options
	state map[string]int // 0 unvisited, visiting, done
	edges map[string]*edges
	order []string
	pos   map[string]int
	stack []string
}

const (
	visiting = 1
	done     = 2
)

func (c *closer) edgesOf(name string) (*edges, error) {
	if e, ok := c.edges[name]; ok {
		return e, nil
	}
	t := c.t
	var (
		hard []string
		sd   softdep
	)
	if t.hasDep {
		hard = t.depLists[name]
		if t.softdeps != nil {
			sd = t.softdeps[name]
		} else {
			// depmod older than modules.softdep: the module still knows.
			mi, err := t.modinfo(name)
			if err != nil {
				return nil, err
			}
			sd = mi.soft
		}
	} else {
		mi, err := t.modinfo(name)
		if err != nil {
			return nil, err
		}
		hard, sd = mi.depends, mi.soft
	}
	e := &edges{}
	for _, d := range hard {
		switch {
		case t.files[d] != "":
			e.hard = append(e.hard, d)
		case t.builtin[d]:
		default:
			return nil, fmt.Errorf("module %s depends on %s: %w in %s", name, d, ErrNotFound, t.dir)
		}
	}
	var err error
	if e.pre, err = c.providers(name, sd.pre); err != nil {
		return nil, err
	}
	if e.post, err = c.providers(name, sd.post); err != nil {
		return nil, err
	}
	for _, im := range implied[name] {
		switch {
		case im.accel && c.opts.NoAcceleration:
		case t.files[im.name] != "":
			e.implied = append(e.implied, im)
		case t.builtin[im.name], !im.required:
		default:
			t.note("module %s implies %s, which is neither a module file nor built in: skipped", name, im.name)
		}
	}
	c.edges[name] = e
	return e, nil
}

// providers resolves soft dependency targets, which may be module names or
// aliases (ext4's "pre: crypto-crc32c"), to every module file providing
// them: modprobe would load them all, and the kernel then picks the best
// implementation that registered.
func (c *closer) providers(of string, targets []string) ([]string, error) {
	t := c.t
	var out []string
	for _, target := range targets {
		n := Normalize(target)
		if _, ok := t.files[n]; ok {
			out = append(out, n)
			continue
		}
		if t.builtin[n] {
			continue
		}
		idx, err := t.loadAliases()
		if err != nil {
			return nil, err
		}
		provs, err := t.confirm(t.inTree(idx.lookup(target)), target)
		if err != nil {
			return nil, err
		}
		if len(provs) == 0 && len(t.builtinAliases.lookup(target)) == 0 {
			t.note("module %s: soft dependency %s: no module provides it; skipped", of, target)
		}
		out = append(out, provs...)
	}
	return dedupe(out), nil
}

// markRequired marks the modules needed through hard dependencies and
// required implications; every other module of the closure is Optional.
func (c *closer) markRequired(name string, required map[string]bool) error {
	if required[name] {
		return nil
	}
	required[name] = true
	e, err := c.edgesOf(name)
	if err != nil {
		return err
	}
	for _, d := range e.hard {
		if err := c.markRequired(d, required); err != nil {
			return err
		}
	}
	for _, im := range e.implied {
		if im.required {
			if err := c.markRequired(im.name, required); err != nil {
				return err
			}
		}
	}
	return nil
}

// visit places name after everything it needs (depth first, post-order)
// and its "post" soft dependencies after it. A cycle through hard
// dependencies is an error; a soft edge that would close a cycle is
// dropped, as modprobe does.
func (c *closer) visit(name string, hard bool) error {
	switch c.state[name] {
	case done:
		return nil
	case visiting:
		if hard {
			return fmt.Errorf("module dependency cycle: %s → %s", strings.Join(c.stack, " → "), name)
		}
		return nil
	}
	c.state[name] = visiting
	c.stack = append(c.stack, name)
	e, err := c.edgesOf(name)
	if err != nil {
		return err
	}
	for _, p := range e.pre {
		if err := c.visit(p, false); err != nil {
			return err
		}
	}
	for _, d := range e.hard {
		if err := c.visit(d, true); err != nil {
			return err
		}
	}
	for _, im := range e.implied {
		if err := c.visit(im.name, false); err != nil {
			return err
		}
	}
	c.stack = c.stack[:len(c.stack)-1]
	c.state[name] = done
	c.pos[name] = len(c.order)
	c.order = append(c.order, name)
	for _, p := range e.post {
		if err := c.visit(p, false); err != nil {
			return err
		}
	}
	return nil
}

// modules builds the result: each module's Deps are everything that must
// precede it, following the edges the order honours.
func (c *closer) modules(required map[string]bool) []Module {
	before := map[string][]string{}
	for _, m := range c.order {
		e := c.edges[m]
		var direct []string
		direct = append(direct, e.hard...)
		direct = append(direct, e.pre...)
		for _, im := range e.implied {
			direct = append(direct, im.name)
		}
		before[m] = append(before[m], direct...)
		for _, p := range e.post {
			before[p] = append(before[p], m)
		}
	}
	deps := map[string]map[string]bool{}
	out := make([]Module, 0, len(c.order))
	for _, m := range c.order {
		set := map[string]bool{}
		for _, d := range before[m] {
			if c.pos[d] >= c.pos[m] {
				c.t.note("module %s: soft dependency on %s dropped: it would close a cycle", m, d)
				continue
			}
			set[d] = true
			for dd := range deps[d] {
				set[dd] = true
			}
		}
		deps[m] = set
		list := make([]string, 0, len(set))
		for d := range set {
			list = append(list, d)
		}
		sort.Slice(list, func(i, j int) bool { return c.pos[list[i]] < c.pos[list[j]] })
		out = append(out, Module{
			Name:     m,
			Path:     c.t.files[m],
			Deps:     list,
			Optional: !required[m],
		})
	}
	return out
}

func dedupe(in []string) []string {
	seen := map[string]bool{}
	out := in[:0]
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}
