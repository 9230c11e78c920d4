// A program outside the defkv repository using the installed Go module: compresses a golden
// case with DefensiveKV and checks the kept entries against the expected file.
// Usage: defkv-consumer CASE.safetensors EXPECTED.safetensors
package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strconv"

	defkv "github.com/defkv/defkv/bindings/go"
)

type entry struct {
	Shape   []int64 `json:"shape"`
	Offsets [2]int  `json:"data_offsets"`
}

type file struct {
	meta    map[string]string
	entries map[string]entry
	data    []byte
}

func read(path string) (*file, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint64(b[:8])
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(b[8:8+n], &hdr); err != nil {
		return nil, err
	}
	f := &file{meta: map[string]string{}, entries: map[string]entry{}, data: b[8+n:]}
	for k, v := range hdr {
		if k == "__metadata__" {
			_ = json.Unmarshal(v, &f.meta)
			continue
		}
		var e entry
		if err := json.Unmarshal(v, &e); err != nil {
			return nil, err
		}
		f.entries[k] = e
	}
	return f, nil
}

func (f *file) raw(name string) []byte {
	e := f.entries[name]
	return f.data[e.Offsets[0]:e.Offsets[1]]
}

func (f *file) f32(name string) ([]float32, []int64) {
	r := f.raw(name)
	out := make([]float32, len(r)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(r[4*i:]))
	}
	return out, f.entries[name].Shape
}

func run(casePath, expPath string) error {
	c, err := read(casePath)
	if err != nil {
		return err
	}
	exp, err := read(expPath)
	if err != nil {
		return err
	}
	q, qs := c.f32("layers.0.queries")
	k, ks := c.f32("layers.0.keys")
	v, _ := c.f32("layers.0.values")
	o, os_ := c.f32("layers.0.o_proj")

	ctx, err := defkv.NewContext()
	if err != nil {
		return err
	}
	defer ctx.Close()
	qt, _ := defkv.F32Tensor(q, qs...)
	kt, _ := defkv.F32Tensor(k, ks...)
	vt, _ := defkv.F32Tensor(v, ks...)
	ot, _ := defkv.F32Tensor(o, os_...)
	layer := &defkv.Layer{Seqs: []defkv.Sequence{{Queries: qt, Keys: kt, Values: vt}}, OProj: ot}
	p := defkv.NewParams(defkv.DefensiveKV)
	p.CompressionRatio, _ = strconv.ParseFloat(c.meta["compression_ratio"], 64)
	w, _ := strconv.Atoi(c.meta["window"])
	kern, _ := strconv.Atoi(c.meta["kernel"])
	p.Window, p.Kernel = int32(w), int32(kern)
	sel, err := ctx.Select(p, layer)
	if err != nil {
		return err
	}
	keep := exp.raw("layers.0.keep")
	if len(keep) != len(sel.KeepMask) {
		return fmt.Errorf("keep mask has %d entries, expected %d", len(sel.KeepMask), len(keep))
	}
	diff := 0
	for i := range keep {
		if keep[i] != sel.KeepMask[i] {
			diff++
		}
	}
	hl := exp.raw("layers.0.head_lens")
	for h := range sel.HeadLens {
		if int32(binary.LittleEndian.Uint32(hl[4*h:])) != sel.HeadLens[h] {
			diff++
		}
	}
	if diff != 0 {
		return fmt.Errorf("%d entries differ from %s", diff, expPath)
	}
	if err := ctx.CompactInPlace(layer, sel); err != nil {
		return err
	}
	fmt.Printf("go consumer: defkv %s: %d kept entries over %d heads match the expected file\n",
		defkv.Version(), len(sel.Indices), len(sel.HeadLens))
	return nil
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: defkv-consumer CASE.safetensors EXPECTED.safetensors")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "go consumer:", err)
		os.Exit(1)
	}
}
