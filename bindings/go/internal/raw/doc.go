// Package raw is the SWIG-generated wrapper of libdefkv (see raw.swig and
// bindings/swig/defkv.i). It is internal: use package defkv.
package raw

/*
#cgo LDFLAGS: -ldefkv
*/
import "C"
