// A registered multiplier: sequential, so appmult.sim must refuse it.
module registered4x4 (
    input  wire       clk,
    input  wire [3:0] a,
    input  wire [3:0] b,
    output reg  [7:0] p
);
    always @(posedge clk) p <= a * b;
endmodule
