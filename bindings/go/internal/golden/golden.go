// Package golden reads the safetensors conformance files (tests and the example only).
package golden

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
)

type entry struct {
	Dtype   string  `json:"dtype"`
	Shape   []int64 `json:"shape"`
	Offsets [2]int  `json:"data_offsets"`
}

// File is one safetensors file.
type File struct {
	Meta    map[string]string
	entries map[string]entry
	data    []byte
}

// Read parses a safetensors file: 8-byte LE header length, JSON header, raw LE data.
func Read(path string) (*File, error) {
	buf, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint64(buf[:8])
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(buf[8:8+n], &hdr); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	f := &File{Meta: map[string]string{}, entries: map[string]entry{}, data: buf[8+n:]}
	for k, v := range hdr {
		if k == "__metadata__" {
			if err := json.Unmarshal(v, &f.Meta); err != nil {
				return nil, err
			}
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

// Shape of a tensor.
func (f *File) Shape(name string) []int64 { return f.entries[name].Shape }

func (f *File) bytes(name, dtype string) []byte {
	e, ok := f.entries[name]
	if !ok || e.Dtype != dtype {
		panic(fmt.Sprintf("tensor %s (%s) missing", name, dtype))
	}
	return f.data[e.Offsets[0]:e.Offsets[1]]
}

// F32 returns a float32 tensor's data.
func (f *File) F32(name string) []float32 {
	b := f.bytes(name, "F32")
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

// I32 returns an int32 tensor's data.
func (f *File) I32(name string) []int32 {
	b := f.bytes(name, "I32")
	out := make([]int32, len(b)/4)
	for i := range out {
		out[i] = int32(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

// U8 returns a uint8 tensor's data.
func (f *File) U8(name string) []uint8 { return append([]uint8(nil), f.bytes(name, "U8")...) }

// Dir is the conformance directory: $DEFKV_CONFORMANCE_DIR or the repository's copy.
func Dir() string {
	if d := os.Getenv("DEFKV_CONFORMANCE_DIR"); d != "" {
		return d
	}
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "../../../../tests/data/conformance")
}

// Cases and methods of the public golden set.
var (
	Cases   = []string{"pub1-g4-L1024", "pub2-g1-L300", "pub3-g8-L700", "pub4-3layer-L512"}
	Methods = []string{"snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv",
		"layer-defensivekv", "streamingllm", "knorm", "tova"}
)

// Layer is one layer of a case.
type Layer struct {
	Queries, Keys, Values, OProj []float32
	QShape, KVShape, OShape      []int64
}

// Case is a loaded case.
type Case struct {
	Layers         []Layer
	Window, Kernel int32
	Ratio          float64
}

// Load reads NAME.case.safetensors.
func Load(name string) (*Case, error) {
	f, err := Read(filepath.Join(Dir(), name+".case.safetensors"))
	if err != nil {
		return nil, err
	}
	n, _ := strconv.Atoi(f.Meta["n_layers"])
	w, _ := strconv.Atoi(f.Meta["window"])
	k, _ := strconv.Atoi(f.Meta["kernel"])
	r, _ := strconv.ParseFloat(f.Meta["compression_ratio"], 64)
	c := &Case{Window: int32(w), Kernel: int32(k), Ratio: r}
	for i := 0; i < n; i++ {
		p := fmt.Sprintf("layers.%d.", i)
		c.Layers = append(c.Layers, Layer{Queries: f.F32(p + "queries"), Keys: f.F32(p + "keys"),
			Values: f.F32(p + "values"), OProj: f.F32(p + "o_proj"), QShape: f.Shape(p + "queries"),
			KVShape: f.Shape(p + "keys"), OShape: f.Shape(p + "o_proj")})
	}
	return c, nil
}
