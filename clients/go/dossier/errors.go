package dossier

import (
	"errors"
	"fmt"

	pb "dossier.internal/go/api/dossierv1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a request's final failure: the server's refusal (Detail set) or the client's own
// (no seed answered, the deadline passed, no shard covers the patient).
type Error struct {
	// The gRPC code of the last answer (codes.DeadlineExceeded when the client gave up).
	Code codes.Code
	// The server's machine-readable detail; nil for the client's own errors and transport
	// failures.
	Detail *pb.ErrorDetail
	// What happened, for people.
	Message string
	// Attempts made before giving up (0 for errors found before sending).
	Attempts int
}

func (e *Error) Error() string {
	reason := "client"
	if e.Detail != nil {
		reason = e.Detail.Reason.String()
	}
	if e.Attempts > 1 {
		return fmt.Sprintf("dossier: %s (%s) after %d attempts: %s", e.Code, reason, e.Attempts, e.Message)
	}
	return fmt.Sprintf("dossier: %s (%s): %s", e.Code, reason, e.Message)
}

// Reason is the ErrorReason of the detail (ERROR_REASON_UNSPECIFIED without one).
func (e *Error) Reason() pb.ErrorReason {
	if e.Detail == nil {
		return pb.ErrorReason_ERROR_REASON_UNSPECIFIED
	}
	return e.Detail.Reason
}

// ReasonOf is the ErrorReason of any error this package returns (UNSPECIFIED for others).
func ReasonOf(err error) pb.ErrorReason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason()
	}
	return pb.ErrorReason_ERROR_REASON_UNSPECIFIED
}

// DetailOf reads the ErrorDetail of a gRPC error from the standard error model: the
// google.rpc.Status details, where it travels packed as an Any. Nil when the error carries none
// (a transport failure, or a server older than the standard error model).
func DetailOf(err error) *pb.ErrorDetail {
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	for _, d := range st.Details() {
		if detail, ok := d.(*pb.ErrorDetail); ok && detail.Reason != pb.ErrorReason_ERROR_REASON_UNSPECIFIED {
			return detail
		}
	}
	return nil
}

func codeOf(err error) codes.Code { return status.Code(err) }

func clientError(code codes.Code, format string, args ...interface{}) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}
