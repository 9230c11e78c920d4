// Command compress_case compresses a golden case and prints the kept entries per KV head.
// Usage: compress_case [CASE] [METHOD]   (default pub2-g1-L300 defensivekv)
package main

import (
	"fmt"
	"os"

	defkv "github.com/defkv/defkv/bindings/go"
	"github.com/defkv/defkv/bindings/go/internal/golden"
)

func main() {
	name, mname := "pub2-g1-L300", "defensivekv"
	if len(os.Args) > 1 {
		name = os.Args[1]
	}
	if len(os.Args) > 2 {
		mname = os.Args[2]
	}
	if err := run(name, mname); err != nil {
		fmt.Fprintln(os.Stderr, "compress_case:", err)
		os.Exit(1)
	}
}

func run(name, mname string) error {
	m, err := defkv.MethodFromName(mname)
	if err != nil {
		return err
	}
	c, err := golden.Load(name)
	if err != nil {
		return err
	}
	ctx, err := defkv.NewContext()
	if err != nil {
		return err
	}
	defer ctx.Close()
	p := defkv.NewParams(m)
	p.CompressionRatio, p.Window, p.Kernel = c.Ratio, c.Window, c.Kernel
	var layers []*defkv.Layer
	for _, l := range c.Layers {
		q, _ := defkv.F32Tensor(l.Queries, l.QShape...)
		k, _ := defkv.F32Tensor(l.Keys, l.KVShape...)
		v, _ := defkv.F32Tensor(l.Values, l.KVShape...)
		o, _ := defkv.F32Tensor(l.OProj, l.OShape...)
		layers = append(layers, &defkv.Layer{Seqs: []defkv.Sequence{{Queries: q, Keys: k, Values: v}}, OProj: o})
	}
	var sels []*defkv.Selection
	if m == defkv.LayerDefensiveKV {
		g, err := ctx.NewGlobal(p, len(layers))
		if err != nil {
			return err
		}
		defer g.Close()
		for i, l := range layers {
			if err := g.AddLayer(i, l); err != nil {
				return err
			}
		}
		if err := g.Select(); err != nil {
			return err
		}
		for i := range layers {
			s, err := g.LayerSelection(i)
			if err != nil {
				return err
			}
			sels = append(sels, s)
		}
	} else {
		for _, l := range layers {
			s, err := ctx.Select(p, l)
			if err != nil {
				return err
			}
			sels = append(sels, s)
		}
	}
	fmt.Printf("defkv %s %s %s\n", defkv.Version(), name, m.Name())
	for i, s := range sels {
		for h := range s.HeadLens {
			k := s.Kept(h)
			n := len(k)
			if n > 8 {
				n = 8
			}
			fmt.Printf("layer %d head %d: kept %d entries, first %v\n", i, h, len(k), k[:n])
		}
	}
	return nil
}
