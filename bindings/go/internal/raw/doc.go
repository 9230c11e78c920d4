// Package raw is the SWIG-generated wrapper of libdefkv (see raw.swig and defkv.i). It is
// internal: use package defkv.
package raw

/*
#cgo pkg-config: defkv
*/
import "C"
