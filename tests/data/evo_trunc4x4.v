// EvoApprox-style ports (A, B, O) and gate-level assigns: a 4x4 unsigned
// multiplier without the partial products of columns 0 and 1
// (a0b0, a1b0, a0b1), i.e. O = A*B - (those bits' weights).
module evo_trunc4x4 (A, B, O);
  input [3:0] A;
  input [3:0] B;
  output [7:0] O;
  wire [7:0] r0, r1, r2, r3;
  assign r0 = {4'b0000, A[3] & B[0], A[2] & B[0], 2'b00};
  assign r1 = {3'b000, A[3] & B[1], A[2] & B[1], A[1] & B[1], 2'b00};
  assign r2 = {2'b00, A & {4{B[2]}}, 2'b00};
  assign r3 = {1'b0, A & {4{B[3]}}, 3'b000};
  assign O = r0 + r1 + r2 + r3;
endmodule
